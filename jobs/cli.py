"""The `renderfleet` command line."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from pipelines.catalog import CatalogError
from storage.manifest import ManifestError
from storage.params import Limits
from storage.results import DEFAULT_DEADLINE_S, JobStopped

EXIT_RESULTS_UNAVAILABLE = JobStopped.exit_code  # results could not be recorded; the same command resumes


def resume_command(argv: list[str]) -> str:
    """The command line that reruns this one (and so resumes it), quoted for a POSIX shell."""
    import shlex

    prog = ["renderfleet"] if os.path.basename(sys.argv[0]) == "renderfleet" else [sys.executable, "-m", "jobs.cli"]
    return shlex.join(prog + argv)


def _render_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--catalog", help="model catalog YAML (default: the tiny random-weight catalog)")
    p.add_argument("--workers", type=int, help="render actors (default: one per GPU, or CPUs/2)")
    p.add_argument("--batch-size", type=int, default=8, help="rows per actor call (default 8)")
    p.add_argument("--address", help="Ray cluster address (default: $RAY_ADDRESS, else a local cluster)")
    p.add_argument("--torch-threads", type=int, help="torch threads per actor (default: sized from the cluster)")
    p.add_argument("--gpus-per-worker", type=float, default=1.0, help="GPU share per actor on GPU clusters")
    p.add_argument("--max-steps", type=int, default=Limits.max_steps, help="largest num_inference_steps a row may ask for")
    p.add_argument("--max-pixels", type=int, default=Limits.max_pixels, help="largest width*height a row may ask for")
    p.add_argument("--safety-action", choices=["block", "blur", "flag"],
                   help="what an output the safety checker flags becomes (default: the catalog's safety.action)")
    p.add_argument("--model-memory-mb", type=int, help="loaded models per actor (default: most of the device's memory)")
    p.add_argument("--results-flush-rows", type=int, default=1000, help="write a results part every N rows")
    p.add_argument("--results-flush-seconds", type=float, default=10.0, help="... or every N seconds")
    p.add_argument("--results-deadline-seconds", type=float, default=DEFAULT_DEADLINE_S,
                   help="how long failing results writes (S3 down, a read-only disk) are retried, rows kept, before "
                        f"the job stops with exit status {EXIT_RESULTS_UNAVAILABLE} (default {DEFAULT_DEADLINE_S:.0f})")
    p.add_argument("--input-root", action="append", default=[], metavar="DIR",
                   help="a local folder rows' input assets, LoRAs and embeddings may come from, besides the manifest's "
                        "own folder (repeatable; default: none)")


def _job(args: argparse.Namespace, manifest: str, out: str):
    from jobs.render import RenderJob

    return RenderJob(
        manifest=manifest,
        out=out,
        catalog=args.catalog,
        workers=args.workers,
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
    )


def _run_job(job) -> int:
    from jobs.render import run

    report = run(job)
    for line in report.lines():
        print(line)
    return 0


def cmd_render(args: argparse.Namespace) -> int:
    return _run_job(_job(args, args.manifest, args.out))


def cmd_demo(args: argparse.Namespace) -> int:
    from jobs.demo import write_demo_manifest

    from jobs.report import write_report

    manifest = write_demo_manifest(args.out, args.rows)
    print(f"demo manifest: {manifest}")
    status = _run_job(_job(args, manifest, args.out))
    print(f"report: {write_report(args.out)}")
    return status


def cmd_status(args: argparse.Namespace) -> int:
    from storage.results import results_dir, summarize

    s = summarize(args.out)
    print(f"results: {results_dir(args.out)}")
    print(f"rows: {s.total}  " + "  ".join(f"{k}={s.by_status.get(k, 0)}" for k in ("ok", "failed", "filtered")))
    for reason, n in s.failures.items():
        print(f"  failed {reason}: {n}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from jobs.report import write_report

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


def cmd_serve(args: argparse.Namespace) -> int:
    import time

    from ray import serve

    from cluster.renderer import storage_env
    from cluster.runtime import connect
    from cluster.serve_app import ServeConfig, build_app, load_api_keys
    from jobs.render import resolve_catalog
    from pipelines.catalog import renderfleet_home

    keys = load_api_keys(args.api_keys_file)
    host = args.host
    if not keys and host not in ("127.0.0.1", "localhost", "::1"):
        print(f"no API keys configured: binding 127.0.0.1 instead of {host} (set --api-keys-file or RENDERFLEET_API_KEYS)")
        host = "127.0.0.1"
    elif not keys:
        print("no API keys configured: serving without auth on 127.0.0.1 only")
    catalog = resolve_catalog(args.catalog)
    store = args.store or str(renderfleet_home() / "serve-store")
    config = ServeConfig(catalog_path=catalog, store=store, api_keys=keys,
                         public_url=args.public_url or f"http://{host}:{args.port}", env=storage_env())
    connect(args.address)
    serve.start(http_options={"host": host, "port": args.port})
    serve.run(build_app(config), name="renderfleet", route_prefix="/")
    print(f"serving on http://{host}:{args.port}/v1 (outputs in {store}); Ctrl-C stops")
    try:
        while True:
            time.sleep(3600)
    finally:
        serve.shutdown()


def cmd_build_tiny(args: argparse.Namespace) -> int:
    from pipelines.tiny import build_tiny_models

    print(build_tiny_models(args.dir, args.names or None))
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="renderfleet", description="Batch rendering of diffusion models on Ray")
    sub = p.add_subparsers(dest="command", required=True)

    r = sub.add_parser("render", help="render every row of a Parquet manifest (resumes with the same --out)")
    r.add_argument("manifest", help="Parquet file or directory, local or s3://")
    r.add_argument("--out", required=True, help="output location, local dir or s3://bucket/prefix")
    _render_args(r)
    r.set_defaults(func=cmd_render)

    d = sub.add_parser("demo", help="render a small demo manifest on the embedded defaults")
    d.add_argument("--out", default="renderfleet-demo", help="output location (default ./renderfleet-demo)")
    d.add_argument("--rows", type=int, default=12, help="text-to-image rows (one row of every other task follows)")
    _render_args(d)
    d.set_defaults(func=cmd_demo)

    s = sub.add_parser("status", help="counts by status and failures by reason")
    s.add_argument("out")
    s.set_defaults(func=cmd_status)

    g = sub.add_parser("report", help="write OUT/report.html: a self-contained gallery of the outputs and results")
    g.add_argument("out")
    g.set_defaults(func=cmd_report)

    v = sub.add_parser("verify", help="check files for renderfleet's watermark, provenance metadata and C2PA credentials")
    v.add_argument("files", nargs="+", help="local paths or s3:// URIs")
    v.add_argument("--catalog", help="take the watermark method and message from this catalog's safety section")
    v.add_argument("--message", help="the 48-bit watermark message as 12 hex digits (default: renderfleet's own)")
    v.add_argument("--method", choices=["dwtDct", "dwtDctSvd"])
    v.set_defaults(func=cmd_verify)

    sv = sub.add_parser("serve", help="serve the catalog over HTTP (OpenAI-compatible images API, video, audio, meshes)")
    sv.add_argument("--catalog", help="model catalog YAML (default: the tiny random-weight catalog)")
    sv.add_argument("--host", default="127.0.0.1")
    sv.add_argument("--port", type=int, default=8000)
    sv.add_argument("--store", help="where outputs are kept: a local dir or s3://bucket/prefix")
    sv.add_argument("--public-url", help="base URL clients use to reach this server (for `url` responses)")
    sv.add_argument("--api-keys-file", help="bearer API keys, one per line (also $RENDERFLEET_API_KEYS)")
    sv.add_argument("--address", help="Ray cluster address (default: $RAY_ADDRESS, else a local cluster)")
    sv.set_defaults(func=cmd_serve)

    m = sub.add_parser("models", help="model utilities")
    msub = m.add_subparsers(dest="models_command", required=True)
    b = msub.add_parser("build-tiny", help="build the tiny random-weight models and their catalog")
    b.add_argument("dir")
    b.add_argument("names", nargs="*", help="models to build (default: all)")
    b.set_defaults(func=cmd_build_tiny)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser().parse_args(argv)
    logging.basicConfig(level=os.environ.get("RENDERFLEET_LOG_LEVEL", "WARNING"), format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except (ManifestError, CatalogError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except JobStopped as e:
        print(e.explain(resume_command(argv)), file=sys.stderr)
        return EXIT_RESULTS_UNAVAILABLE
    except KeyboardInterrupt:
        print("interrupted: rerun the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
