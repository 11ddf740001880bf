"""Online latency and batching gain on the tiny model, measured in one run.

p50/p95 at concurrency 1 and 16, the HTTP overhead over a direct Renderer call, and the
throughput gain of @serve.batch at concurrency 16 (max_batch_size 8 vs 1, same replica size).
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


def main() -> None:
    import httpx
    import ray
    import yaml
    from ray import serve

    from cluster.renderer import Renderer, RendererConfig
    from cluster.serve_app import ServeConfig, build_app
    from jobs.render import resolve_catalog

    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--size", default="64x64")
    p.add_argument("--steps", type=int, default=4)
    args = p.parse_args()
    tiny = Path(resolve_catalog(None))
    work = Path(tempfile.mkdtemp(prefix="rf-serve-bench-"))
    data = yaml.safe_load(tiny.read_text())
    catalogs = {}
    for batch in (8, 1):
        entry = dict(data["models"]["tiny-sd"], source=str(tiny.parent / "tiny-sd"))
        entry["serve"] = {"min_replicas": 1, "max_replicas": 1, "max_batch_size": batch, "batch_wait_timeout_s": 0.05,
                          "max_ongoing_requests": 64, "max_queued_requests": 1024}
        path = work / f"catalog-{batch}.yaml"
        path.write_text(yaml.safe_dump({"models": {"tiny-sd": entry}}))
        catalogs[batch] = str(path)
    w, h = (int(x) for x in args.size.split("x"))
    row = {"id": "direct", "prompt": "a bench scene", "width": w, "height": h, "num_inference_steps": args.steps}

    renderer = Renderer(RendererConfig(catalog_path=catalogs[8], out=str(work / "direct"), torch_threads=1))
    renderer.render_rows([dict(row)])
    direct = []
    for i in range(20):
        started = time.perf_counter()
        renderer.render_rows([dict(row, id=f"direct-{i}")])
        direct.append(time.perf_counter() - started)
    del renderer

    ray.init(address="local", num_cpus=2, include_dashboard=False)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    base = f"http://127.0.0.1:{port}"
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    for batch in (8, 1):
        config = ServeConfig(catalog_path=catalogs[batch], store=str(work / f"store-{batch}"), public_url=base)
        serve.run(build_app(config), name=f"b{batch}", route_prefix=f"/b{batch}")

    def call(prefix: str, i: int) -> float:
        started = time.perf_counter()
        r = httpx.post(f"{base}{prefix}/v1/images/generations", timeout=300,
                       json={"prompt": f"a bench scene {i}", "size": args.size, "num_inference_steps": args.steps})
        r.raise_for_status()
        return time.perf_counter() - started

    for prefix in ("/b8", "/b1"):
        call(prefix, -1)
    sequential = [call("/b8", i) for i in range(20)]
    figures = {}
    for batch in (8, 1):
        with ThreadPoolExecutor(16) as pool:
            started = time.perf_counter()
            lat = list(pool.map(lambda i: call(f"/b{batch}", i), range(args.requests)))
            figures[batch] = (lat, args.requests / (time.perf_counter() - started))
    serve.shutdown()
    ray.shutdown()

    d50 = statistics.median(direct)
    print(f"direct Renderer call ({args.size}, {args.steps} steps, 1 thread): p50 {d50 * 1000:.0f} ms")
    print(f"HTTP concurrency 1: p50 {pct(sequential, .5) * 1000:.0f} ms, p95 {pct(sequential, .95) * 1000:.0f} ms; "
          f"overhead over direct {(pct(sequential, .5) - d50) * 1000:.0f} ms ({pct(sequential, .5) / d50:.2f}x)")
    for batch in (8, 1):
        lat, rps = figures[batch]
        print(f"HTTP concurrency 16, max_batch_size {batch}: p50 {pct(lat, .5) * 1000:.0f} ms, "
              f"p95 {pct(lat, .95) * 1000:.0f} ms, {rps:.2f} images/s")
    print(f"batching gain at concurrency 16: {figures[8][1] / figures[1][1]:.2f}x")


if __name__ == "__main__":
    main()
