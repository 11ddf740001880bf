"""Overlap of finishing (checker, watermark, encode, metadata, write) with the next pipeline call, measured.

Three ways, each with a latency-bound stand-in renderer (it sleeps: an accelerator that leaves the CPU free)
and with the real tiny SD: no overlap (1 batch per actor), in-actor overlap (2 calls per actor: one renders,
one finishes) and a separate Ray Data finishing stage (decoded outputs passed on through the object store).
Run: `python -m bench.overlap` from the repo root. Prints figures from this one run.
"""

from __future__ import annotations

import argparse
import os
import pickle
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p)  # actors import bench

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
from PIL import Image  # noqa: E402

from cluster.renderer import Renderer, RendererConfig  # noqa: E402
from storage.results import RESULT_SCHEMA  # noqa: E402


class StandIn(Renderer):
    """The real renderer, its pipeline call replaced by a sleep of `latency_s` per batch."""

    latency_s = 0.15

    def _call(self, task: str, stages: list[tuple[Any, dict[str, Any]]], requests: list[Any]) -> list[Any]:
        time.sleep(float(os.environ.get("RF_STANDIN_LATENCY_S", self.latency_s)))
        s = stages[0][1]
        return [Image.fromarray(np.random.default_rng(r.seed).integers(0, 255, (s["height"], s["width"], 3), dtype=np.uint8))
                for r in requests]


class RenderStage:
    """Stage 1 of the separate-stage variant: checks and renders; decoded outputs go on, pickled."""

    def __init__(self, config: RendererConfig, stand_in: bool):
        self.r = (StandIn if stand_in else Renderer)(config)

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = batch.to_pylist()
        results, rendered = self.r._render_all(rows)
        return pa.table({"payload": [pickle.dumps((rows, results, rendered))]})


class FinishStage:
    """Stage 2: the CPU-only finishing actor (checker, watermark, encode, write)."""

    def __init__(self, config: RendererConfig):
        self.r = Renderer(config)

    def __call__(self, batch: pa.Table) -> pa.Table:
        out = []
        for payload in batch.column("payload").to_pylist():
            rows, results, rendered = pickle.loads(payload)
            for group in rendered:
                for job, result in self.r._finish_group(group, rows, False):
                    results[job.index] = result
            out += results
        return pa.Table.from_pylist(out, schema=RESULT_SCHEMA)


def direct(catalog: str, work: str, size: int, batch: int, batches: int) -> None:
    """Threads, no Ray: the renderer's own overlap with the stand-in."""
    from cluster.overlap import overlapped

    rows = [{"id": f"d{size}-{i}", "prompt": f"p {i}", "width": size, "height": size, "num_inference_steps": 2}
            for i in range(batch * batches)]
    work_batches = [rows[i:i + batch] for i in range(0, len(rows), batch)]
    rate = {}
    for depth in (1, 2):
        r = StandIn(RendererConfig(catalog_path=catalog, out=f"{work}/direct-{size}-{depth}", torch_threads=1,
                                   overlap_batches=depth))
        r.render_rows(work_batches[0])  # warm-up: model load
        r.overlap.events.clear()
        started = time.perf_counter()
        with ThreadPoolExecutor(depth) as pool:
            list(pool.map(r.render_rows, work_batches))
        rate[depth] = len(rows) / (time.perf_counter() - started)
        finish_s, hidden_s = overlapped(list(r.overlap.events))
        print(f"direct stand-in {size}x{size}, batch {batch}, {StandIn.latency_s * 1000:.0f} ms per call, depth {depth}: "
              f"{rate[depth]:.2f} rows/s; finishing {finish_s / len(rows) * 1000:.1f} ms per image, "
              f"{100 * hidden_s / max(finish_s, 1e-9):.0f}% of it hidden behind pipeline calls")
    print(f"  overlap gain {rate[2] / rate[1]:.2f}x")


def ray_data(catalog: str, work: str, stand_in: bool, size: int, steps: int, batch: int, rows: int) -> None:
    import ray
    from ray.data import ActorPoolStrategy

    from cluster.overlap import render_pool

    label = "stand-in" if stand_in else "tiny-sd"
    items = [{"id": f"{label}-{i}", "prompt": f"p {i}", "width": size, "height": size, "num_inference_steps": steps}
             for i in range(rows)]
    cls = StandIn if stand_in else Renderer
    for variant in ("no overlap", "in-actor overlap", "separate stage"):
        out = f"{work}/{label}-{variant.replace(' ', '-')}"
        config = RendererConfig(catalog_path=catalog, out=out, torch_threads=1,
                                overlap_batches=2 if variant == "in-actor overlap" else 1)
        ds = ray.data.from_items(items).repartition(target_num_rows_per_block=batch)
        if variant == "separate stage":
            ds = ds.map_batches(RenderStage, fn_constructor_kwargs={"config": config, "stand_in": stand_in},
                                compute=ActorPoolStrategy(size=1), batch_size=batch, batch_format="pyarrow", num_cpus=0.5)
            ds = ds.map_batches(FinishStage, fn_constructor_kwargs={"config": config}, compute=ActorPoolStrategy(size=1),
                                batch_size=1, batch_format="pyarrow", num_cpus=0.5)
        else:
            ds = ds.map_batches(cls, fn_constructor_kwargs={"config": config},
                                compute=render_pool(1, config.overlap_batches),
                                batch_size=batch, batch_format="pyarrow", num_cpus=0.5)
        first = None
        seen = ok = 0
        started = time.perf_counter()
        for b in ds.iter_batches(batch_format="pyarrow", batch_size=None):
            if first is None:
                first, first_rows = time.perf_counter(), b.num_rows
            seen += b.num_rows
            ok += sum(1 for s in b.column("status").to_pylist() if s == "ok")
        end = time.perf_counter()
        steady = (seen - first_rows) / max(end - first, 1e-9)
        print(f"ray data {label} {size}x{size}, batch {batch}, {variant}: {steady:.2f} rows/s after the first output "
              f"({seen} rows, {ok} ok, {end - started:.1f} s in all)")


def main() -> None:
    import ray
    import torch

    from jobs.render import resolve_catalog

    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--rows", type=int, default=48)
    p.add_argument("--skip-direct", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(1)
    catalog = resolve_catalog(None)
    work = tempfile.mkdtemp(prefix="rf-overlap-")
    if not args.skip_direct:
        for size in (256, 512):
            direct(catalog, work, size, batch=4, batches=8)
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    ray_data(catalog, work, stand_in=True, size=256, steps=2, batch=4, rows=args.rows)
    ray_data(catalog, work, stand_in=False, size=128, steps=4, batch=8, rows=args.rows)
    ray.shutdown()
    sys.stdout.flush()


if __name__ == "__main__":
    main()
