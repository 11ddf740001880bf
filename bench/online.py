"""Section (f): the online endpoint over HTTP against the same renderer called directly, same batching.

Direct, at concurrency c: c requests arrive together, the renderer takes them in batches of up to
max_batch_size in turn; a request's latency is the time until its batch is done. That is what the
endpoint's batching would give with no HTTP, proxy, gateway or Serve queue in between.
"""

from __future__ import annotations

import socket
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from bench.common import Ctx, pct, section_result, start_ray, stop_ray, target, tiny_sd_catalog

BATCH_WAIT_S = 0.05


def _serve_settings(batch: int) -> dict[str, Any]:
    return {"min_replicas": 1, "max_replicas": 1, "max_batch_size": batch, "batch_wait_timeout_s": BATCH_WAIT_S,
            "max_ongoing_requests": 64, "max_queued_requests": 1024}


def _direct(catalog: str, out: Path, row: dict[str, Any], levels: dict[int, int], batch: int) -> dict[int, tuple[list[float], float]]:
    """Per concurrency: latencies and requests/s of the renderer called in this process, batches of `batch`."""
    from cluster.renderer import Renderer, RendererConfig

    renderer = Renderer(RendererConfig(catalog_path=catalog, out=str(out), torch_threads=1, job_id="serve"))
    renderer.render_rows([dict(row, id="warm")], keep_data=True)
    results = {}
    n = 0
    for c, total in levels.items():
        latencies: list[float] = []
        started = time.perf_counter()
        for _ in range(max(1, total // c)):
            round_start = time.perf_counter()
            for lo in range(0, c, batch):
                size = min(batch, c - lo)
                rows = [dict(row, id=f"d{n + i}", prompt=f"a bench scene {n + i}") for i in range(size)]
                renderer.render_rows(rows, caller_writes=[r["id"] for r in rows])  # as for b64_json over HTTP
                n += size
                latencies += [time.perf_counter() - round_start] * size
        results[c] = (latencies, len(latencies) / (time.perf_counter() - started))
    return results


def _http(base: str, prefix: str, size: str, steps: int, c: int, total: int) -> tuple[list[float], float]:
    import httpx

    client = httpx.Client(timeout=300)

    def call(i: int) -> float:
        started = time.perf_counter()
        r = client.post(f"{base}{prefix}/v1/images/generations",
                        json={"prompt": f"a bench scene {i}", "size": size, "num_inference_steps": steps})
        r.raise_for_status()
        return time.perf_counter() - started

    with ThreadPoolExecutor(c) as pool:
        started = time.perf_counter()
        latencies = list(pool.map(call, range(total)))
        rate = total / (time.perf_counter() - started)
    client.close()
    return latencies, rate


def _gateway_only(base: str, prefix: str, total: int) -> list[float]:
    """Latencies of GET /v1/models: the HTTP proxy and the gateway, without the hop to a model replica."""
    import httpx

    with httpx.Client(timeout=60) as client:
        client.get(f"{base}{prefix}/v1/models").raise_for_status()
        latencies = []
        for _ in range(total):
            started = time.perf_counter()
            client.get(f"{base}{prefix}/v1/models").raise_for_status()
            latencies.append(time.perf_counter() - started)
    return latencies


def section_f(ctx: Ctx) -> dict[str, Any]:
    import httpx
    from ray import serve

    from cluster.serve_app import ServeConfig, build_app

    side, steps, batch = 64, ctx.pick(4, 2), 8
    levels = {1: ctx.pick(20, 3), 4: ctx.pick(40, 8), 16: ctx.pick(64, 16)}
    size = f"{side}x{side}"
    catalogs = {b: tiny_sd_catalog(ctx.work / f"serve-{b}", serve=_serve_settings(b)) for b in (batch, 1)}
    row = {"id": "direct", "prompt": "a bench scene", "width": side, "height": side, "num_inference_steps": steps}
    direct = _direct(catalogs[batch], ctx.work / "direct", row, levels, batch)

    ray_s = start_ray()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    base = f"http://127.0.0.1:{port}"
    started = time.perf_counter()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(ServeConfig(catalog_path=catalogs[batch], store=str(ctx.work / "store"), public_url=base)),
              name=f"b{batch}", route_prefix=f"/b{batch}")
    ready_s = time.perf_counter() - started
    cold = _http(base, f"/b{batch}", size, steps, 1, 1)[0][0]
    serve.run(build_app(ServeConfig(catalog_path=catalogs[1], store=str(ctx.work / "store1"), public_url=base)),
              name="b1", route_prefix="/b1")
    httpx.post(f"{base}/b1/v1/images/generations", json={"prompt": "warm", "size": size, "num_inference_steps": steps},
               timeout=300).raise_for_status()
    http = {c: _http(base, f"/b{batch}", size, steps, c, total) for c, total in levels.items()}
    gateway = _gateway_only(base, f"/b{batch}", levels[1])
    unbatched = _http(base, "/b1", size, steps, 16, levels[16])
    # From zero: a model at min_replicas 0 gets its replica placed, its checkpoint loaded, then renders.
    zero = tiny_sd_catalog(ctx.work / "serve-zero", serve={**_serve_settings(1), "min_replicas": 0})
    serve.run(build_app(ServeConfig(catalog_path=zero, store=str(ctx.work / "store0"), public_url=base)),
              name="z", route_prefix="/z")
    from_zero = _http(base, "/z", size, steps, 1, 1)[0][0]
    serve.shutdown()
    stop_ray()

    figures: dict[str, float] = {}
    for c in levels:
        for name, (lat, rate) in (("http", http[c]), ("direct", direct[c])):
            figures.update({f"{name}_c{c}_p50_ms": pct(lat, .5) * 1000, f"{name}_c{c}_p95_ms": pct(lat, .95) * 1000,
                            f"{name}_c{c}_per_s": rate})
    overhead = figures["http_c1_p50_ms"] - figures["direct_c1_p50_ms"]
    figures["gateway_only_p50_ms"] = pct(gateway, .5) * 1000  # proxy + gateway; the rest is the replica hop
    gain = http[16][1] / unbatched[1] if unbatched[1] else 0.0
    figures.update({"http_overhead_c1_p50_ms": overhead, "batching_gain_c16": gain, "http_c16_unbatched_per_s": unbatched[1],
                    "ray_start_s": ray_s, "time_to_ready_s": ready_s, "cold_request_ms": cold * 1000,
                    "from_zero_request_ms": from_zero * 1000,
                    "direct_c1_mean_ms": statistics.mean(direct[1][0]) * 1000})
    units = {k: ("ms" if k.endswith("_ms") else "requests/s" if k.endswith("_per_s") else "s" if k.endswith("_s") else "x")
             for k in figures}
    notes = [f"tiny SD {size}, {steps} steps (compute-bound on CPU), one replica, torch 1 thread, on both sides: "
             f"max_batch_size {batch}, batch_wait_timeout_s {BATCH_WAIT_S}; batching gain: requests/s at concurrency 16 "
             f"with max_batch_size {batch} over max_batch_size 1",
             "direct: the same Renderer in this process, requests taken in batches of up to max_batch_size "
             "and outputs finished but not stored, as for b64_json over HTTP, where the gateway stores them after "
             "answering (bench/online.py); HTTP: httpx to a Serve app on 127.0.0.1 (proxy, gateway, model deployment)",
             f"time to ready: serve.start + serve.run until the app answers (Ray start {ray_s:.1f} s before it); "
             f"profile of the HTTP overhead: GET /v1/models (proxy and gateway only) took "
             f"{figures['gateway_only_p50_ms']:.1f} ms p50; the rest of the {overhead:.1f} ms is the gateway's call to "
             "the model replica through its handle and Serve's batch queue",
             "cold request: the first request after ready; from zero: the first request to a model at "
             "min_replicas 0 (replica placed, checkpoint loaded, then the render)"]
    cs = list(levels)
    return section_result("(f) online: HTTP vs a direct renderer call", figures, units,
                          [target("http_overhead_c1_p50_ms", overhead, "<=", 15.0, "≤ 15 ms"),
                           target("batching_gain_c16", gain, ">=", 2.0, "≥ 2x")],
                          {"size": size, "steps": steps, "max_batch_size": batch, "batch_wait_timeout_s": BATCH_WAIT_S,
                           "requests": levels}, notes,
                          {"kind": "line", "title": "(f) p50 latency by concurrency", "xlabel": "concurrency",
                           "ylabel": "ms", "x": cs, "series": {"HTTP p50": [figures[f"http_c{c}_p50_ms"] for c in cs],
                                                              "direct p50": [figures[f"direct_c{c}_p50_ms"] for c in cs],
                                                              "HTTP p95": [figures[f"http_c{c}_p95_ms"] for c in cs]}})
