"""The `renderfleet` command line."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from jobs.exits import (EXIT_INTERRUPTED, EXIT_RESULTS_UNAVAILABLE, EXIT_ROWS_FAILED, EXIT_USAGE, RESULTS_DEADLINE_S,
                        UsageError)
from jobs.setup_commands import cmd_build_tiny, cmd_env, cmd_init, cmd_models_list
from jobs.scaling_args import add_scaling_args, scaling_fields
from storage.params import Limits

# Heavy imports (pyarrow datasets, torch, Ray) stay inside the commands, so --help and --version are quick.
EXIT_CODES_HELP = (f"exit status: 0 every row final; {EXIT_ROWS_FAILED} more rows failed than --max-failed-fraction "
                   f"allows; {EXIT_USAGE} unusable input; {EXIT_RESULTS_UNAVAILABLE} results could not be written "
                   f"(rerun to resume); {EXIT_INTERRUPTED} interrupted; 1 a crash")


class DefaultsFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows "(default: X)" on every option whose help does not already say its default in words."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text or action.default is None:
            return text
        return super()._get_help_string(action) or text


def _fraction(text: str) -> float:
    """argparse type for --max-failed-fraction: a number in [0, 1]."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"{text} is outside 0..1")
    return value


def resume_command(argv: list[str]) -> str:
    """The command line that reruns this one (and so resumes it), quoted for a POSIX shell."""
    import shlex

    prog = ["renderfleet"] if os.path.basename(sys.argv[0]) == "renderfleet" else [sys.executable, "-m", "jobs.cli"]
    return shlex.join(prog + argv)


def _render_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--catalog", help="model catalog YAML (default: the tiny random-weight catalog)")
    p.add_argument("--verbose", action="store_true",
                   help="show every third-party warning and Ray's INFO lines (default: known-harmless ones hidden; "
                        "the driver's full log, its warnings included, is in OUT/logs/RUN_ID.log either way)")
    p.add_argument("--max-failed-fraction", type=_fraction, default=0.0, metavar="F",
                   help=f"exit 0 despite failed rows while failed/total <= F, else {EXIT_ROWS_FAILED}")
    add_scaling_args(p)  # --workers N|MIN..MAX, --worker-resources NAME=AMOUNT
    p.add_argument("--batch-size", type=int, default=8, help="rows per actor call")
    p.add_argument("--address", help="Ray cluster address (default: $RAY_ADDRESS, else a local cluster)")
    p.add_argument("--torch-threads", type=int, help="torch threads per actor (default: sized from the cluster)")
    p.add_argument("--gpus-per-worker", type=float, default=1.0,
                   help="GPU share per actor on GPU clusters (0.5: two actors per device, each with half its memory)")
    p.add_argument("--policy", action="append", default=[], metavar="KEY=VALUE",
                   help="override a memory/speed policy key of every model for this job, e.g. offload=auto, "
                        "compile=regional, channels_last=true (repeatable; keys: see pipelines/catalog.py; default: none)")
    p.add_argument("--max-steps", type=int, default=Limits.max_steps, help="largest num_inference_steps a row may ask for")
    p.add_argument("--max-pixels", type=int, default=Limits.max_pixels, help="largest width*height a row may ask for")
    p.add_argument("--safety-action", choices=["block", "blur", "flag"],
                   help="what an output the safety checker flags becomes (default: the catalog's safety.action)")
    p.add_argument("--model-memory-mb", type=int, help="loaded models per actor (default: most of the device's memory)")
    p.add_argument("--results-flush-rows", type=int, default=1000, help="write a results part every N rows")
    p.add_argument("--results-flush-seconds", type=float, default=10.0, help="... or every N seconds")
    p.add_argument("--results-deadline-seconds", type=float, default=RESULTS_DEADLINE_S,
                   help="how long failing results writes (S3 down, a read-only disk) are retried, rows kept, before "
                        f"the job stops with exit status {EXIT_RESULTS_UNAVAILABLE} (default {RESULTS_DEADLINE_S:.0f})")
    p.add_argument("--input-root", action="append", default=[], metavar="DIR",
                   help="a local folder rows' input assets, LoRAs and embeddings may come from, besides the manifest's "
                        "own folder (repeatable; default: none)")


def _check_uri(uri: str, what: str, write: bool = False) -> None:
    """Refuses (exit 2, before Ray starts) a scheme no store supports, or writing to a read-only store."""
    from storage.fs import check_uri
    try:
        check_uri(uri, what, write)
    except ValueError as e:
        raise UsageError(str(e)) from None


def _job(args: argparse.Namespace, manifest: str, out: str):
    _check_uri(manifest, "MANIFEST")
    _check_uri(out, "--out", write=True)
    from jobs.render import RenderJob

    return RenderJob(
        manifest=manifest,
        out=out,
        catalog=args.catalog,
        **scaling_fields(args),  # workers, max_workers, worker_resources
        batch_size=args.batch_size,
        address=args.address,
        limits=Limits(max_steps=args.max_steps, max_pixels=args.max_pixels),
        torch_threads=args.torch_threads,
        gpus_per_worker=args.gpus_per_worker,
        results_flush_rows=args.results_flush_rows,
        safety_action=args.safety_action,
        model_memory_bytes=args.model_memory_mb * 2**20 if args.model_memory_mb else None,
        results_flush_s=args.results_flush_seconds,
        results_deadline_s=args.results_deadline_seconds,
        input_roots=tuple(args.input_root),
        policy=_policy_overrides(args.policy),
    )


def _policy_overrides(items: list[str]) -> dict[str, str]:
    """--policy KEY=VALUE pairs, checked (exit 2) before Ray starts."""
    from pipelines.catalog import CatalogError, parse_overrides

    try:
        return parse_overrides(items)
    except CatalogError as e:
        raise UsageError(str(e)) from None


def _run_job(job, max_failed_fraction: float) -> int:
    from jobs.render import run

    report = run(job)
    for line in report.lines():
        print(line)
    print(report.verdict(max_failed_fraction))
    return report.exit_status(max_failed_fraction)


def cmd_render(args: argparse.Namespace) -> int:
    return _run_job(_job(args, args.manifest, args.out), args.max_failed_fraction)


def cmd_demo(args: argparse.Namespace) -> int:
    from jobs.demo import write_demo_manifest

    from jobs.report import write_report

    _check_uri(args.out, "--out", write=True)
    manifest = write_demo_manifest(args.out, args.rows)
    print(f"demo manifest: {manifest}")
    status = _run_job(_job(args, manifest, args.out), args.max_failed_fraction)
    print(f"report: {write_report(args.out)}")
    return status


def _require_results(out: str) -> None:
    """Refuses (exit 2) a path that holds no results: a typo must not read as "0 rows" or create a folder."""
    from storage.fs import is_remote
    from storage.results import has_results, results_dir

    _check_uri(out, "OUT")
    if not is_remote(out) and not os.path.exists(out):
        raise UsageError(f"{out}: no such folder; give the --out of a render")
    if not has_results(out):
        raise UsageError(f"{out}: no results here (nothing under {results_dir(out)}); "
                         "give the --out of a render")


def cmd_status(args: argparse.Namespace) -> int:
    from jobs.status import status_json, status_lines
    from storage.results import summarize

    _require_results(args.out)
    s = summarize(args.out)
    print(status_json(args.out, s) if args.json else "\n".join(status_lines(args.out, s, show_all=args.all)))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from jobs.report import write_report

    _require_results(args.out)
    print(f"report: {write_report(args.out)}")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from jobs.verify import print_verdict, verify
    from pipelines.catalog import Catalog
    from pipelines.media.watermark import WatermarkConfig

    if args.message:
        config = WatermarkConfig.from_hex(args.message, args.method or "dwtDctSvd")
    elif args.catalog:
        safety = Catalog.load(args.catalog).safety
        config = (WatermarkConfig.from_hex(safety.watermark_message, args.method or safety.watermark_method)
                  if safety.watermark_message else WatermarkConfig(method=args.method or safety.watermark_method))
    else:
        config = WatermarkConfig(method=args.method or "dwtDctSvd")
    verdicts = [verify(uri, config) for uri in args.files]
    for v in verdicts:
        print_verdict(v)
    return 0 if all(v.ok for v in verdicts) else 1


def version() -> str:
    from importlib import metadata

    try:
        return metadata.version("renderfleet")
    except metadata.PackageNotFoundError:
        return "unknown (not installed)"


def _sub(sub: argparse._SubParsersAction, name: str, text: str, epilog: str | None = None) -> argparse.ArgumentParser:
    return sub.add_parser(name, help=text, description=text, epilog=epilog, formatter_class=DefaultsFormatter)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="renderfleet", description="Batch rendering of diffusion models on Ray",
                                epilog=EXIT_CODES_HELP, formatter_class=DefaultsFormatter)
    p.add_argument("--version", action="version", version=f"renderfleet {version()}")
    sub = p.add_subparsers(dest="command", required=True)

    r = _sub(sub, "render", "render every row of a manifest (resumes with the same --out)", EXIT_CODES_HELP)
    r.add_argument("manifest", help="Parquet, CSV or JSON Lines file, or a folder of one kind, local or in a store (s3://, gs://, az://, hf://)")
    r.add_argument("--out", required=True, help="output location, local dir or store prefix (s3://, gs://, az://) (required, no default)")
    _render_args(r)
    r.set_defaults(func=cmd_render)

    d = _sub(sub, "demo", "render a small demo manifest on the embedded defaults", EXIT_CODES_HELP)
    d.add_argument("--out", default="renderfleet-demo", help="output location")
    d.add_argument("--rows", type=int, default=12, help="text-to-image rows (one row of every other task follows)")
    _render_args(d)
    d.set_defaults(func=cmd_demo)

    s = _sub(sub, "status", "counts by status and failure reason, and the failed ids, of a render's --out")
    s.add_argument("out", help="the --out of a render (local dir or s3://)")
    s.add_argument("--all", action="store_true", help="list every failed id (default: the first 20)")
    s.add_argument("--json", action="store_true", help="one JSON object for scripts: totals, counts, reasons, all failed ids")
    s.set_defaults(func=cmd_status)

    g = _sub(sub, "report", "write OUT/report.html: a self-contained gallery of the outputs and results")
    g.add_argument("out", help="the --out of a render (local dir or s3://)")
    g.set_defaults(func=cmd_report)

    v = _sub(sub, "verify", "check files for renderfleet's watermark, provenance metadata and C2PA credentials")
    v.add_argument("files", nargs="+", help="local paths or s3:// URIs")
    v.add_argument("--catalog", help="take the watermark method and message from this catalog's safety section "
                                     "(default: renderfleet's own settings)")
    v.add_argument("--message", help="the 48-bit watermark message as 12 hex digits (default: renderfleet's own)")
    v.add_argument("--method", choices=["dwtDct", "dwtDctSvd"], help="watermark method (default: the catalog's, else dwtDctSvd)")
    v.set_defaults(func=cmd_verify)


    e = _sub(sub, "env", "versions, devices and the catalog in use, for bug reports")
    e.add_argument("--catalog", help="the catalog a job would use (default: the tiny random-weight catalog)")
    e.add_argument("--json", action="store_true", help="print one JSON object")
    e.set_defaults(func=cmd_env)

    i = _sub(sub, "init", "write a starter project: an example manifest per task, a catalog to edit, a README.txt")
    i.add_argument("dir", help="folder to write into (created if missing)")
    i.add_argument("--force", action="store_true", help="overwrite files that already exist")
    i.set_defaults(func=cmd_init)

    m = _sub(sub, "models", "model utilities")
    msub = m.add_subparsers(dest="models_command", required=True)
    b = _sub(msub, "build-tiny", "build the tiny random-weight models and their catalog")
    b.add_argument("dir", help="folder to build into (DIR/catalog.yaml is the catalog)")
    b.add_argument("names", nargs="*", help="models to build (default: all)")
    b.set_defaults(func=cmd_build_tiny)
    ml = _sub(msub, "list", "list a catalog's models: name, kind, tasks, source")
    ml.add_argument("--catalog", help="model catalog YAML (default: the tiny random-weight catalog, built on first use)")
    ml.set_defaults(func=cmd_models_list)
    from jobs.benchmark import add_bench_parser  # bench, bench gpu: the benchmarks in the checkout's bench/
    add_bench_parser(sub, _sub)
    from jobs.submit import add_commands  # submit render, jobs status|logs|stop: Ray's Job Submission API
    add_commands(sub, _sub, _render_args)
    from jobs import export, schedule  # like submit's, their modules import nothing heavy up front
    schedule.add_parser(sub, _sub), export.add_parser(sub, _sub)
    from jobs import serve as serve_cmd  # serve: the online endpoint, its models and readiness (jobs/serve.py)
    serve_cmd.add_parser(sub, _sub)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser().parse_args(argv)
    logging.basicConfig(level=os.environ.get("RENDERFLEET_LOG_LEVEL", "WARNING"), format="%(levelname)s %(name)s: %(message)s")
    if hasattr(args, "verbose"):  # jobs that render: quiet terminal, full log file (cluster/quiet.py)
        from cluster.quiet import quiet_driver

        quiet_driver(verbose=args.verbose)
    try:
        return args.func(args)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("interrupted: rerun the same command to resume", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as e:
        from pipelines.catalog import CatalogError
        from storage.manifest import ManifestError
        from storage.results import JobStopped

        if isinstance(e, (ManifestError, CatalogError)):
            print(f"error: {e}", file=sys.stderr)
            return EXIT_USAGE
        if isinstance(e, JobStopped):
            print(e.explain(resume_command(argv)), file=sys.stderr)
            return EXIT_RESULTS_UNAVAILABLE
        raise


if __name__ == "__main__":
    sys.exit(main())
