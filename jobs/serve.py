"""`renderfleet serve`: the online endpoint for the models you choose, ready when its warm models run."""

from __future__ import annotations

import argparse
import time
from typing import Callable

from jobs.exits import UsageError

LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")


def ready_line(url: str, warm: list[str], cold: list[str], auth: str) -> str:
    """The one line printed when the server is ready."""
    models = ", ".join([f"{m} (warm)" for m in warm] + [f"{m} (cold: starts on first request)" for m in cold])
    return f"ready: {url}/v1 models: {models or 'none'}; auth: {auth}"


def cmd_serve(args: argparse.Namespace) -> int:
    from ray import serve
    from ray.serve.api import _run  # serve.run without waiting: readiness (warm models, HTTP) is checked below

    from cluster.placement import wait_ready
    from cluster.renderer_config import storage_env
    from cluster.runtime import connect
    from cluster.serve_app import ServeConfig, build_app, load_api_keys, served_models
    from jobs.render import resolve_catalog
    from pipelines.catalog import Catalog, CatalogError, renderfleet_home
    from storage.fs import check_uri

    try:
        check_uri(args.store or "", "--store", write=True)
        keys = load_api_keys(args.api_keys_file)
        catalog = resolve_catalog(args.catalog)
        names = served_models(Catalog.load(catalog), [n.strip() for n in args.models.split(",") if n.strip()]
                              if args.models else None)
    except (ValueError, OSError, CatalogError) as e:
        raise UsageError(str(e)) from None
    host = args.host
    if not keys and not args.api_keys_file and host not in LOCAL_HOSTS:
        print(f"no API keys configured: binding 127.0.0.1 instead of {host} (set --api-keys-file or RENDERFLEET_API_KEYS)")
        host = "127.0.0.1"
    auth = "API keys (Bearer)" if keys or args.api_keys_file else "none (127.0.0.1 only)"
    store = args.store or str(renderfleet_home() / "serve-store")
    fixed = load_api_keys(None)  # the file's keys are re-read by the gateway when the file changes
    config = ServeConfig(catalog_path=catalog, store=store, api_keys=fixed, api_keys_file=args.api_keys_file,
                         public_url=args.public_url or f"http://{host}:{args.port}", env=storage_env(),
                         replica_cpus=args.replica_cpus, placement_timeout_s=args.placement_timeout,
                         load_timeout_s=args.load_timeout, job_retention_s=args.job_retention,
                         gateway_replicas=args.gateway_replicas)
    connect(args.address)
    started = time.monotonic()
    serve.start(http_options={"host": host, "port": args.port})
    _run(build_app(config, names), name="renderfleet", route_prefix="/", _blocking=False)  # ready: wait_ready below
    entries = Catalog.load(catalog).models
    warm = [n for n in names if entries[n].serve.min_replicas > 0]
    url = f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{args.port}"
    try:
        state = wait_ready("renderfleet", url, warm, args.ready_timeout)
    except TimeoutError as e:
        print(f"not ready: {e}; `serve status` shows why")
        serve.shutdown()
        return 1
    print(ready_line(f"http://{host}:{args.port}", state["warm"], state["cold"], auth)
          + f" (in {time.monotonic() - started:.1f} s; outputs in {store}; Ctrl-C stops)", flush=True)
    try:
        while True:
            time.sleep(3600)
    finally:
        serve.shutdown()


def add_parser(sub: argparse._SubParsersAction, new_parser: Callable[..., argparse.ArgumentParser]) -> None:
    """Adds `serve` to the CLI's subcommands; `new_parser` is the CLI's own subparser factory."""
    sv = new_parser(sub, "serve", "serve catalog models over HTTP (OpenAI-compatible images, videos and async jobs, "
                                  "audio, meshes)")
    sv.add_argument("--catalog", help="model catalog YAML (default: the tiny random-weight catalog)")
    sv.add_argument("--models", help="comma-separated pipelines to serve, or `all` (default: the catalog's default "
                                     "model plus those with `serve: {enabled: true}`); others answer 404")
    sv.add_argument("--host", default="127.0.0.1", help="address to bind (without API keys: 127.0.0.1 only)")
    sv.add_argument("--port", type=int, default=8000, help="port to bind")
    sv.add_argument("--store", help="where outputs and async jobs are kept: a local dir or s3://bucket/prefix "
                                    "(default: $RENDERFLEET_HOME/serve-store)")
    sv.add_argument("--public-url", help="base URL clients use to reach this server, for `url` responses "
                                         "(default: http://HOST:PORT)")
    sv.add_argument("--api-keys-file", help="bearer API keys, one per line, or YAML with per-key limits and models; "
                                            "re-read when it changes (default: $RENDERFLEET_API_KEYS, else none)")
    sv.add_argument("--replica-cpus", type=float, default=0.25, help="CPUs per model replica unless its `serve: "
                                                                     "num_cpus` says otherwise")
    sv.add_argument("--placement-timeout", type=float, default=60.0, help="seconds a request waits for a replica "
                    "of a model no node can hold before a 503 model_unplaceable naming what is missing")
    sv.add_argument("--load-timeout", type=float, default=600.0, help="seconds a request waits for a replica a "
                    "node can hold to start (scheduled, checkpoint loaded) before a 503: a cold start, not a fault")
    sv.add_argument("--job-retention", type=float, default=24 * 3600.0, help="seconds finished async jobs, their "
                                                                             "outputs and uploads are kept")
    sv.add_argument("--gateway-replicas", type=_positive, default=1, help="HTTP gateway replicas (per-key rate "
                    "limits are counted across all of them)")
    sv.add_argument("--ready-timeout", type=float, default=600.0, help="seconds to wait for the warm models")
    sv.add_argument("--address", help="Ray cluster address (default: $RAY_ADDRESS, else a local cluster)")
    sv.set_defaults(func=cmd_serve)


def _positive(text: str) -> int:
    if not text.strip().isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of at least 1, got {text!r}")
    return int(text)
