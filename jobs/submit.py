"""`renderfleet submit` and `renderfleet jobs`: renders on a remote Ray cluster through Ray's Job Submission API.

The job's runtime_env ships this project as its working_dir, so the cluster runs the code you have here.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any, Callable

from jobs.exits import UsageError

# Never shipped in a job's working_dir: VCS data, caches, tests and their outputs, bench outputs, models,
# renders. `.rayignore` at the project root lists the same patterns, so a plain
# `ray job submit --working-dir .` ships the same files (tests/test_submit.py checks both).
WORKING_DIR_EXCLUDES: tuple[str, ...] = (
    ".git", ".ci", ".hypothesis", ".pytest_cache", ".benchmarks", ".mypy_cache", ".ruff_cache", ".venv", "venv",
    "__pycache__", "*.pyc", "*.egg-info", "/build", "/dist", "/tests", "/out", "/renderfleet-out",
    "/renderfleet-demo", "/bench/out*", "/bench/results*", "models", "*.parquet", "*.safetensors", "*.bin", "*.ckpt",
    "*.pt", "*.pth", "*.onnx", "*.png", "*.jpg", "*.jpeg", "*.webp", "*.gif", "*.mp4", "*.wav", "*.glb", "*.ply",
    "*.zip", "*.tar", "*.tar.gz", "*.log",
)
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
ADDRESS_HELP = "the cluster's Ray dashboard, http://HEAD:8265 (default: $RAY_API_SERVER_ADDRESS, else $RAY_ADDRESS)"
TOKEN_HINT = "give its token with --token-file FILE or $RAY_AUTH_TOKEN"
TOKEN_HELP = ("file holding the cluster's auth token (default: Ray's own lookup: $RAY_AUTH_TOKEN, "
              "then the file $RAY_AUTH_TOKEN_PATH, then ~/.ray/auth_token; none found: no token sent)")


def project_dir() -> Path | None:
    """The source tree this renderfleet runs from, when it is one (an editable install or a checkout)."""
    root = Path(__file__).resolve().parent.parent
    return root if (root / "pyproject.toml").is_file() and (root / "jobs" / "cli.py").is_file() else None


def auth_token(token_file: str | None = None) -> str | None:
    """The token as Ray's clients find it (Ray's precedence); a named file that is missing or empty is an error."""
    if token_file or os.environ.get("RAY_AUTH_TOKEN_PATH"):
        path = Path(token_file or os.environ["RAY_AUTH_TOKEN_PATH"]).expanduser()
        try:
            token = path.read_text().strip()
        except OSError as e:
            raise UsageError(f"cannot read the auth token file {path}: {e.strerror}") from None
        if not token:
            raise UsageError(f"the auth token file {path} is empty")
        return token
    if os.environ.get("RAY_AUTH_TOKEN", "").strip():
        return os.environ["RAY_AUTH_TOKEN"].strip()
    default = Path.home() / ".ray" / "auth_token"
    if not default.is_file():
        return None
    return default.read_text().strip() or None


def job_address(address: str | None) -> str:
    """The dashboard's http(s) address: --address, else $RAY_API_SERVER_ADDRESS, else $RAY_ADDRESS (as `ray job`)."""
    address = address or os.environ.get("RAY_API_SERVER_ADDRESS") or os.environ.get("RAY_ADDRESS")
    if not address:
        raise UsageError("no cluster given: pass --address http://HEAD:8265 (the Ray dashboard) or set RAY_ADDRESS")
    if not address.startswith(("http://", "https://")):
        raise UsageError(f"{address!r} is not a dashboard address: the Jobs API wants http://HEAD:8265")
    return address.rstrip("/")


def job_client(address: str | None, token_file: str | None = None) -> Any:
    """A JobSubmissionClient that sends the token as `Authorization: Bearer` (what Ray's dashboard checks)."""
    from ray.job_submission import JobSubmissionClient

    url = job_address(address)
    token = auth_token(token_file)
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    from ray.exceptions import AuthenticationError

    try:
        return JobSubmissionClient(url, headers=headers)
    except AuthenticationError as e:
        raise UsageError(f"the cluster at {url} refused the {'token' if token else 'request: no token found'} "
                         f"({_first_line(e)}); {TOKEN_HINT}") from None
    except (ConnectionError, RuntimeError) as e:
        raise UsageError(f"cannot use the Jobs API at {url}: {_first_line(e)}") from None


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return next((line for line in text.splitlines() if line.strip()), type(e).__name__)


def render_argv(args: argparse.Namespace, render_args: Callable[[argparse.ArgumentParser], None]) -> list[str]:
    """`render MANIFEST --out OUT` plus every render option given a non-default value, as the cluster will run it."""
    scratch = argparse.ArgumentParser(add_help=False)
    render_args(scratch)
    argv = ["render", args.manifest, "--out", args.out]
    for action in scratch._actions:
        if action.dest == "address" or not action.option_strings:
            continue
        value = getattr(args, action.dest, action.default)
        if value is None or value == action.default:
            continue
        flag = next(s for s in action.option_strings if s.startswith("--"))
        if isinstance(action, argparse._StoreTrueAction):
            argv.append(flag)
        elif isinstance(action, argparse._AppendAction):
            for item in value:
                argv += [flag, str(item)]
        else:
            argv += [flag, str(value)]
    return argv


def runtime_env(working_dir: Path | None, env: dict[str, str]) -> dict[str, Any]:
    """The job's runtime_env: this project as working_dir (large and generated files excluded), plus env vars."""
    renv: dict[str, Any] = {}
    if working_dir is not None:
        renv["working_dir"] = str(working_dir)
        renv["excludes"] = list(WORKING_DIR_EXCLUDES)
    if env:
        renv["env_vars"] = dict(env)
    return renv


def _env_pairs(items: list[str]) -> dict[str, str]:
    pairs = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UsageError(f"--env wants KEY=VALUE, got {item!r}")
        pairs[key] = value
    return pairs


def cmd_submit_render(args: argparse.Namespace) -> int:
    from storage.fs import check_uri

    try:
        check_uri(args.manifest, "MANIFEST")
        check_uri(args.out, "--out", write=True)
    except ValueError as e:
        raise UsageError(str(e)) from None
    argv = render_argv(args, args.render_args)
    if args.no_working_dir:
        working_dir, prog = None, ["renderfleet"]
    else:
        working_dir = Path(args.working_dir) if args.working_dir else project_dir()
        if working_dir is None or not (working_dir / "jobs" / "cli.py").is_file():
            raise UsageError("no renderfleet source tree to ship: pass --working-dir DIR (a checkout), or "
                             "--no-working-dir to run the renderfleet installed on the cluster")
        prog = ["python", "-m", "jobs.cli"]  # the shipped copy, which Ray puts first on the job's path
    client = job_client(args.address, args.token_file)
    job_id = client.submit_job(
        entrypoint=shlex.join(prog + argv),
        runtime_env=runtime_env(working_dir, _env_pairs(args.env)),
        submission_id=args.submission_id,
        entrypoint_num_cpus=args.entrypoint_num_cpus,
        metadata={"renderfleet_out": args.out},
    )
    print(job_id)
    if not args.wait:
        print(f"follow: renderfleet jobs logs {job_id} --follow --address {job_address(args.address)}", file=sys.stderr)
        return 0
    return _follow(client, job_id)


def _follow(client: Any, job_id: str) -> int:
    """Streams a job's logs until it ends; exits with its driver's status (a render's own exit codes)."""
    import asyncio

    async def tail() -> None:
        async for chunk in client.tail_job_logs(job_id):
            sys.stdout.write(chunk)
            sys.stdout.flush()

    asyncio.run(tail())
    info = wait_terminal(client, job_id, timeout_s=60.0)
    print(f"job {job_id}: {info.status}" + (f" ({info.message})" if info.message else ""), file=sys.stderr)
    if info.driver_exit_code is not None:
        return int(info.driver_exit_code)
    return 0 if str(info.status) == "SUCCEEDED" else 1


def wait_terminal(client: Any, job_id: str, timeout_s: float) -> Any:
    """Polls a job's info until it is SUCCEEDED, FAILED or STOPPED, or the timeout passes; returns the last info."""
    deadline = time.monotonic() + timeout_s
    info = client.get_job_info(job_id)
    while str(info.status) not in TERMINAL and time.monotonic() < deadline:
        time.sleep(0.5)
        info = client.get_job_info(job_id)
    return info


def cmd_jobs_status(args: argparse.Namespace) -> int:
    info = job_client(args.address, args.token_file).get_job_info(args.job_id)
    print(f"{args.job_id}  {info.status}" + (f"  {info.message}" if info.message else ""))
    if info.driver_exit_code is not None:
        print(f"exit status {info.driver_exit_code}")
    return 0


def cmd_jobs_logs(args: argparse.Namespace) -> int:
    client = job_client(args.address, args.token_file)
    if args.follow:
        return _follow(client, args.job_id)
    sys.stdout.write(client.get_job_logs(args.job_id))
    return 0


def cmd_jobs_stop(args: argparse.Namespace) -> int:
    client = job_client(args.address, args.token_file)
    client.stop_job(args.job_id)
    info = wait_terminal(client, args.job_id, timeout_s=args.timeout)
    print(f"{args.job_id}  {info.status}")
    return 0 if str(info.status) in TERMINAL else 1


def _connection_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--address", help=ADDRESS_HELP)
    p.add_argument("--token-file", help=TOKEN_HELP)


def add_commands(sub: argparse._SubParsersAction, make_sub: Callable[..., argparse.ArgumentParser],
                 render_args: Callable[[argparse.ArgumentParser], None]) -> None:
    """Adds `submit render` (the render options as `renderfleet render` has them) and `jobs status|logs|stop`."""
    s = make_sub(sub, "submit", "run a command as a Ray job on a remote cluster (Ray's Job Submission API)")
    ssub = s.add_subparsers(dest="submit_command", required=True)
    r = make_sub(ssub, "render", "submit `renderfleet render` as a Ray job with this project as its working_dir; "
                                 "prints the job id (paths are as the cluster sees them)")
    r.add_argument("manifest", help="Parquet file or directory, in a store (s3://, gs://, az://, hf://) or a path on the cluster")
    r.add_argument("--out", required=True, help="output location, a store prefix or a path on the cluster (required)")
    render_args(r)  # its --address means the dashboard here, not the Ray address `render` connects to
    for action in r._actions:
        if action.dest == "address":
            action.help = ADDRESS_HELP
    r.add_argument("--token-file", help=TOKEN_HELP)
    r.add_argument("--working-dir", help="project folder to ship as the job's working_dir (default: this renderfleet's "
                                         "source tree; large and generated files excluded)")
    r.add_argument("--no-working-dir", action="store_true",
                   help="ship nothing: run the renderfleet installed on the cluster, the image's (default: ship the source tree)")
    r.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                   help="environment variable for the job's driver and workers (repeatable; default: none)")
    r.add_argument("--submission-id", help="the job id to use (default: one Ray makes up)")
    r.add_argument("--entrypoint-num-cpus", type=float, help="CPUs reserved for the driver (default: none)")
    r.add_argument("--wait", action="store_true",
                   help="stream the job's logs until it ends and exit with its exit status (default: print the id and return)")
    r.set_defaults(func=cmd_submit_render, render_args=render_args)

    j = make_sub(sub, "jobs", "status, logs or stop of a submitted job")
    jsub = j.add_subparsers(dest="jobs_command", required=True)
    for name, text, func in (("status", "a job's status and message", cmd_jobs_status),
                             ("logs", "a job's driver log", cmd_jobs_logs),
                             ("stop", "stop a job and wait until it has stopped", cmd_jobs_stop)):
        p = make_sub(jsub, name, text)
        p.add_argument("job_id", help="the id `renderfleet submit` printed")
        _connection_args(p)
        p.set_defaults(func=func)
        if name == "logs":
            p.add_argument("--follow", action="store_true", help="stream until the job ends, then exit with its status")
        if name == "stop":
            p.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for the job to stop")
