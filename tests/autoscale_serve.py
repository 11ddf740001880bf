"""The online half of the autoscaling case (tests/autoscale_kit.py --serve): the public app builder on the fake
autoscaling cluster, replicas scaled up under load and back to zero, and the nodes they needed released."""

from __future__ import annotations

import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import yaml

SERVE = {"min_replicas": 0, "max_replicas": 4, "target_ongoing_requests": 1.0, "num_cpus": 1.0, "upscale_delay_s": 1.0,
         "downscale_delay_s": 3.0, "max_batch_size": 1, "max_ongoing_requests": 2, "max_queued_requests": 64}


def replicas(app: str, name: str) -> int:
    from ray import serve

    status = serve.status().applications[app].deployments[f"model-{name}"]
    return sum(n for state, n in (status.replica_states or {}).items() if str(state).endswith("RUNNING"))


def serve_case(trace: Any, work: str, timeout: float) -> dict[str, Any]:
    """Replicas of 1 CPU each: two fit on the 2-CPU head, more need nodes the autoscaler launches."""
    import httpx
    from ray import serve

    from cluster.serve_app import ServeConfig, build_app
    from pipelines.tiny.standin import build_standin

    folder = Path(work) / "serve"
    build_standin(folder / "standin", ms_per_image=400.0)
    catalog = folder / "catalog.yaml"
    catalog.write_text(yaml.safe_dump({"default_model": "standin", "safety": {"watermark": False}, "models": {
        "standin": {"kind": "pipeline", "source": "standin", "tasks": ["image"], "serve": SERVE,
                    "defaults": {"num_inference_steps": 1, "width": 64, "height": 64}}}}))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    serve.start(http_options={"host": "127.0.0.1", "port": port}, proxy_location="HeadOnly")
    base = f"http://127.0.0.1:{port}"
    serve.run(build_app(ServeConfig(catalog_path=str(catalog), store=str(folder / "store"), public_url=base)),
              name="rf", route_prefix="/")
    figures: dict[str, Any] = {"replicas": [], "codes": {}}
    began = time.monotonic()
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            try:
                figures["replicas"].append((round(time.monotonic() - began, 1), replicas("rf", "standin"), trace.now()[0]))
            except Exception:  # noqa: BLE001 - a missed sample
                pass
            stop.wait(1.0)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    trace.mark("serve load start")

    def one(_: int) -> int:
        try:
            return httpx.post(base + "/v1/images/generations", json={"model": "standin", "prompt": "a lamp"},
                              timeout=120).status_code
        except httpx.HTTPError:
            return -1

    try:
        with ThreadPoolExecutor(12) as pool:
            deadline = time.monotonic() + min(90.0, timeout)
            while time.monotonic() < deadline and max((r[1] for r in figures["replicas"]), default=0) < SERVE["max_replicas"]:
                for code in pool.map(one, range(24)):
                    figures["codes"][str(code)] = figures["codes"].get(str(code), 0) + 1
        trace.mark("serve load end")
        figures["peak_replicas"] = max((r[1] for r in figures["replicas"]), default=0)
        figures["peak_nodes"] = max((r[2] for r in figures["replicas"]), default=0)
        end = time.monotonic() + timeout
        while time.monotonic() < end and not (figures["replicas"] and figures["replicas"][-1][1] == 0):
            time.sleep(1.0)
        figures["zero_after_s"] = round(time.monotonic() - began, 1) if figures["replicas"][-1][1] == 0 else None
        trace.mark("serve replicas at zero" if figures["zero_after_s"] else "serve replicas not at zero")
        end = time.monotonic() + timeout
        while time.monotonic() < end and trace.now()[0] > 1:
            time.sleep(1.0)
        figures["nodes_released"] = trace.now()[0] == 1
        trace.mark("serve nodes released" if figures["nodes_released"] else "serve nodes not released")
    finally:
        stop.set()
        sampler.join(timeout=5)
        serve.shutdown()
    changes: list[tuple[float, int, int]] = []
    for r in figures.pop("replicas"):
        if not changes or r[1:] != changes[-1][1:]:
            changes.append(r)
    figures["replicas_nodes"] = changes  # (seconds, running replicas, alive nodes) at every change
    return figures
