"""`renderfleet submit` / `jobs` against real Ray heads on loopback: one with token auth, one without."""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from helpers import write_manifest
from jobs.cli import main, parser
from jobs.exits import EXIT_USAGE
from jobs.submit import WORKING_DIR_EXCLUDES, auth_token, job_client, project_dir, render_argv, wait_terminal

pytestmark = pytest.mark.timeout(600)
ROOT = Path(__file__).resolve().parent.parent
PACKAGE_LIMIT = 10 * 2**20  # what we allow ourselves; Ray's own limit is far higher


def _free_ports(n: int) -> list[int]:
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(n)]
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]


def _answers(url: str) -> bool:
    try:
        urllib.request.urlopen(url, timeout=2).close()
        return True
    except urllib.error.HTTPError:
        return True  # 401/403/404: the server is up
    except OSError:
        return False


@contextlib.contextmanager
def ray_head(token: str | None) -> Iterator[str]:
    """`ray start --head` with a dashboard on 127.0.0.1, every port free and its own, in its own process group."""
    tmp = tempfile.mkdtemp(prefix="rfs-", dir="/tmp")
    gcs, dash, agent, agent_grpc, metrics, renv, client, nm, om = _free_ports(9)
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0",
           "HOME": os.path.join(tmp, "home"),  # never the machine's ~/.ray/auth_token
           "RAY_AUTH_MODE": "token" if token else "disabled"}
    for key in ("RAY_ADDRESS", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        env.pop(key, None)
    if token:
        env["RAY_AUTH_TOKEN"] = token
    cmd = ["ray", "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={gcs}",
           "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", "--include-dashboard=true",
           f"--dashboard-agent-listen-port={agent}", f"--dashboard-agent-grpc-port={agent_grpc}",
           f"--metrics-export-port={metrics}", f"--runtime-env-agent-port={renv}",
           f"--ray-client-server-port={client}", f"--node-manager-port={nm}", f"--object-manager-port={om}",
           "--num-cpus=2", "--object-store-memory=200000000", f"--temp-dir={tmp}/r", "--disable-usage-stats"]
    log = open(os.path.join(tmp, "head.log"), "wb")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        # The Jobs API needs the dashboard and the node's agent (it runs the job supervisor).
        while not (_answers(f"http://127.0.0.1:{dash}/api/version")
                   and _answers(f"http://127.0.0.1:{agent}/api/local_raylet_healthz")):
            assert proc.poll() is None, Path(tmp, "head.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "the head did not come up in 180 s"
            time.sleep(1)
        yield f"http://127.0.0.1:{dash}"
    finally:
        for sig, wait_s in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, sig)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=wait_s)
                break
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # gcs_server ignores SIGTERM
        proc.wait(timeout=10)
        log.close()


@pytest.fixture
def no_local_token(monkeypatch, tmp_path) -> None:
    """The client sees no token unless a test gives one (not the machine's ~/.ray/auth_token)."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    for key in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_ADDRESS", "RAY_API_SERVER_ADDRESS"):
        monkeypatch.delenv(key, raising=False)


def test_working_dir_package_is_the_code_only():
    """What Ray uploads (its own packaging, .gitignore and our excludes applied) is the project's code, and small."""
    from ray._private.runtime_env.packaging import GCS_STORAGE_MAX_SIZE, create_package

    rayignore = [line for line in (ROOT / ".rayignore").read_text().splitlines() if line and not line.startswith("#")]
    assert rayignore == list(WORKING_DIR_EXCLUDES)
    assert project_dir() == ROOT
    with tempfile.TemporaryDirectory() as tmp:
        zip_path = Path(tmp, "pkg.zip")
        create_package(str(ROOT), zip_path, include_gitignore=True, excludes=list(WORKING_DIR_EXCLUDES))
        names = zipfile.ZipFile(zip_path).namelist()
        size = zip_path.stat().st_size
    print(f"working_dir package: {len(names)} entries, {size / 2**20:.2f} MiB (Ray's limit {GCS_STORAGE_MAX_SIZE / 2**20:.0f} MiB)")
    assert {"pyproject.toml", "jobs/cli.py", "jobs/submit.py", "cluster/batch.py", "storage/fs.py"} <= set(names)
    assert any(n.startswith("pipelines/") for n in names)
    for name in names:
        top = name.split("/")[0]
        assert top not in {".git", ".ci", "tests", ".hypothesis", ".pytest_cache"}, name
        assert "__pycache__" not in name and not name.endswith((".parquet", ".safetensors", ".png")), name
    assert size < PACKAGE_LIMIT


def test_forwarded_render_command_parses_back_to_the_same_options():
    given = ["m.parquet", "--out", "s3://b/run", "--address", "http://h:8265", "--workers", "2", "--verbose",
             "--policy", "offload=auto", "--policy", "channels_last=true", "--max-failed-fraction", "0.25",
             "--token-file", "/t", "--env", "A=1"]
    args = parser().parse_args(["submit", "render", *given])
    argv = render_argv(args, args.render_args)
    assert "--address" not in argv and "--token-file" not in argv and "--env" not in argv
    assert argv[:4] == ["render", "m.parquet", "--out", "s3://b/run"]
    back = vars(parser().parse_args(argv))
    for key, value in vars(parser().parse_args(["render", *given[:3], *given[5:14]])).items():
        assert back[key] == value, key


def test_token_lookup_follows_rays_precedence(no_local_token, monkeypatch, tmp_path):
    assert auth_token() is None
    home_token = tmp_path / "home" / ".ray" / "auth_token"
    home_token.parent.mkdir(parents=True)
    home_token.write_text("from-home\n")
    assert auth_token() == "from-home"
    path_token = tmp_path / "t"
    path_token.write_text("from-path")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(path_token))
    assert auth_token() == "from-path"
    monkeypatch.setenv("RAY_AUTH_TOKEN", "from-env")
    assert auth_token() == "from-path"  # a token file named explicitly wins, as --token-file does
    monkeypatch.delenv("RAY_AUTH_TOKEN_PATH")
    assert auth_token() == "from-env"
    assert auth_token(str(path_token)) == "from-path"
    with pytest.raises(ValueError, match="cannot read"):
        auth_token(str(tmp_path / "missing"))


@pytest.fixture(scope="module")
def token_head() -> Iterator[tuple[str, str]]:
    token = secrets.token_hex(16)
    with ray_head(token) as address:
        yield address, token


def _wait_status(address: str, job_id: str, token_file: str | None, timeout_s: float) -> str:
    info = wait_terminal(job_client(address, token_file), job_id, timeout_s)
    return str(info.status)


def test_token_head_refuses_a_client_without_the_token(token_head, no_local_token, tmp_path, capsys):
    address, _ = token_head
    assert main(["jobs", "status", "raysubmit_x", "--address", address]) == EXIT_USAGE
    assert "no token found" in capsys.readouterr().err
    wrong = tmp_path / "wrong"
    wrong.write_text("not-the-token")
    assert main(["jobs", "status", "raysubmit_x", "--address", address, "--token-file", str(wrong)]) == EXIT_USAGE
    assert "refused the token" in capsys.readouterr().err


def test_submit_render_runs_on_the_cluster(token_head, no_local_token, tmp_path, capsys):
    address, token = token_head
    token_file = tmp_path / "token"
    token_file.write_text(token)
    from pipelines.tiny import build_tiny_models

    catalog = build_tiny_models(tmp_path / "tiny", ["tiny-sd"])
    manifest = write_manifest(str(tmp_path / "m.parquet"), [{"id": "a", "prompt": "red"}, {"id": "b", "prompt": "blue"}])
    out = tmp_path / "out"
    assert main(["submit", "render", manifest, "--out", str(out), "--catalog", str(catalog), "--workers", "1",
                 "--batch-size", "2", "--address", address, "--token-file", str(token_file)]) == 0
    job_id = capsys.readouterr().out.strip()
    assert job_id.startswith("raysubmit_")
    assert _wait_status(address, job_id, str(token_file), 420) == "SUCCEEDED", \
        job_client(address, str(token_file)).get_job_logs(job_id)[-3000:]
    assert main(["jobs", "status", job_id, "--address", address, "--token-file", str(token_file)]) == 0
    assert "SUCCEEDED" in capsys.readouterr().out
    assert main(["jobs", "logs", job_id, "--address", address, "--token-file", str(token_file)]) == 0
    logs = capsys.readouterr().out
    assert "rows: 2 in manifest, 0 skipped (already done), 2 ok" in logs, logs[-2000:]
    from storage.results import read_results

    results = read_results(str(out)).to_pylist()
    assert sorted(r["id"] for r in results) == ["a", "b"] and {r["status"] for r in results} == {"ok"}


def test_stop_ends_a_long_job(token_head, no_local_token, monkeypatch, capsys):
    address, token = token_head
    monkeypatch.setenv("RAY_AUTH_TOKEN", token)
    client = job_client(address)
    job_id = client.submit_job(entrypoint=f"{sys.executable} -c 'import time; time.sleep(600)'")
    deadline = time.monotonic() + 120
    while str(client.get_job_status(job_id)) != "RUNNING":
        assert time.monotonic() < deadline
        time.sleep(0.5)
    assert main(["jobs", "stop", job_id, "--address", address]) == 0
    assert "STOPPED" in capsys.readouterr().out


def test_plain_ray_job_submit_with_the_token(token_head, tmp_path):
    """The documented plain path: `ray job submit --working-dir .` (our .rayignore applies) with the token in the env."""
    address, token = token_head
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token, "HOME": str(tmp_path)}
    done = subprocess.run(["ray", "job", "submit", "--address", address, "--working-dir", ".", "--", "sh", "-c",
                           'echo "path=$PYTHONPATH" && renderfleet --version'],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    out = re.sub(r"\x1b\[[0-9;]*m", "", done.stdout)
    assert done.returncode == 0, out[-2000:] + done.stderr[-2000:]
    assert "renderfleet 0." in out and "succeeded" in out.lower(), out[-2000:]
    # Ray puts the shipped copy on the job's PYTHONPATH, so the console script runs it, not an installed one.
    path = next(line for line in out.splitlines() if line.startswith("path="))
    assert "working_dir_files" in path, path


def test_no_auth_head_and_wait_returns_the_renders_exit_status(no_local_token, tmp_path, capsys):
    with ray_head(None) as address:
        status = main(["submit", "render", str(tmp_path / "missing.parquet"), "--out", str(tmp_path / "out"),
                       "--address", address, "--wait"])
    captured = capsys.readouterr()
    assert status == EXIT_USAGE, captured.out[-2000:] + captured.err[-2000:]
    assert "missing.parquet" in captured.out
