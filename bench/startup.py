"""Section (h): from `renderfleet render` to the first output for a 2-row job, and where that time goes.

The total is the real command in a fresh process, timed until its first output file appears. The parts
are timed apart, right after, in the same order the job meets them: Ray start (cluster.runtime.connect),
actor start (an actor that imports what a render actor imports), model load (in that actor: the
renderer's construction and the first row's render, less a second row's render).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench.common import ROOT, Ctx, section_result, target, write_manifest


def first_output_s(manifest: str, out: Path, catalog: str, timeout_s: float = 300.0) -> tuple[float, float]:
    """(seconds to the first output file, seconds to exit) of `python -m jobs.cli render` in a fresh process."""
    cmd = [sys.executable, "-m", "jobs.cli", "render", manifest, "--out", str(out), "--catalog", catalog]
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=sys.stderr, start_new_session=True)
    first = None
    try:
        while proc.poll() is None and time.perf_counter() - started < timeout_s:
            if first is None and any(p.suffix == ".png" for p in (out / "image").rglob("*") if (out / "image").exists()):
                first = time.perf_counter() - started
            time.sleep(0.02)
        proc.wait(timeout=max(1.0, timeout_s - (time.perf_counter() - started)))
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, 9)
            proc.wait()
    ended = time.perf_counter() - started
    if proc.returncode != 0:
        raise RuntimeError(f"render exited {proc.returncode}")
    return (first if first is not None else ended), ended


class Probe:
    """A Ray actor standing in for a render actor's start: the same imports, then the same renderer."""

    def __init__(self) -> None:
        import cluster.renderer  # noqa: F401 - torch, diffusers, the pipelines: what a render actor imports

        self.imported = cluster.renderer.__name__

    def model_load(self, catalog: str, out: str, threads: int) -> float:
        from cluster.renderer import Renderer, RendererConfig

        row = {"id": "p0", "prompt": "a bench scene", "width": 64, "height": 64, "num_inference_steps": 2}
        started = time.perf_counter()
        renderer = Renderer(RendererConfig(catalog_path=catalog, out=out, torch_threads=threads))
        renderer.render_rows([row])
        first = time.perf_counter() - started
        started = time.perf_counter()
        renderer.render_rows([dict(row, id="p1")])
        return first - (time.perf_counter() - started)


def section_h(ctx: Ctx) -> dict[str, Any]:
    import ray

    from cluster.resources import node_resources, plan_workers
    from cluster.runtime import connect
    from pipelines.tiny import default_catalog_path

    catalog = default_catalog_path()  # what `renderfleet render` runs without --catalog: tiny SD plus its checker
    manifest = write_manifest(ctx.work / "h.parquet", 2, 64, steps=2)
    first, total = first_output_s(manifest, ctx.work / "out", catalog)

    started = time.perf_counter()
    connect()
    ray_s = time.perf_counter() - started
    plan = plan_workers(node_resources())
    started = time.perf_counter()
    probe = ray.remote(num_cpus=plan.num_cpus)(Probe).remote()
    ray.get(probe.__ray_ready__.remote())
    actor_s = time.perf_counter() - started
    load_s = ray.get(probe.model_load.remote(catalog, str(ctx.work / "probe"), plan.torch_threads))
    ray.kill(probe)
    ray.shutdown()
    other = first - ray_s - actor_s - load_s
    figures = {"first_output_s": first, "command_exit_s": total, "ray_start_s": ray_s, "actor_start_s": actor_s,
               "model_load_s": load_s, "other_s": other}
    notes = ["first output: `python -m jobs.cli render` (2 rows, tiny SD 64x64, 2 steps, the tiny catalog with its "
             "safety checker) in a fresh process, until its first PNG appears under OUT",
             "split timed apart right after: Ray start (cluster.runtime.connect), actor start (an actor importing "
             "cluster.renderer), model load (renderer construction + first row, less a second row); other = the rest "
             "(Python and CLI imports, manifest checks, Ray Data planning, the first render call, writing)"]
    parts = ["ray_start_s", "actor_start_s", "model_load_s", "other_s"]
    return section_result("(h) start-up: command to first output, 2-row job", figures, {k: "s" for k in figures},
                          [target("first_output_s", first, "<=", 10.0, "≤ 10 s")], {"rows": 2}, notes,
                          {"kind": "stacked", "title": "(h) command to first output (s)", "ylabel": "s",
                           "x": ["start-up"], "series": {k[:-2].replace("_", " "): [max(0.0, figures[k])] for k in parts}})
