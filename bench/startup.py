"""Section (h): from `renderfleet render` to the first output for a 2-row job, and where that time goes.

The total is the real command in a fresh process, timed until its first output file appears. The parts
come from the same run: the job records its own start-up (OUT/runs/<run>.json `startup`: Ray start, the
driver's manifest checks, its first worker's process start, imports, model load and first batch).
"""

from __future__ import annotations

import json
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


def section_h(ctx: Ctx) -> dict[str, Any]:
    from pipelines.tiny import default_catalog_path

    catalog = default_catalog_path()  # what `renderfleet render` runs without --catalog: tiny SD plus its checker
    manifest = write_manifest(ctx.work / "h.parquet", 2, 64, steps=2)
    first, total = first_output_s(manifest, ctx.work / "out", catalog)
    [summary] = (ctx.work / "out" / "runs").glob("*.json")
    job = json.loads(summary.read_text())["startup"]
    parts = {
        "command_s": max(0.0, first - job["first_output_s"]),  # Python, the CLI's imports, seeing the file appear
        "ray_start_s": job["ray_s"],
        "checks_s": job["checks_s"],
        "actor_start_s": job["worker_process_s"] + job["worker_init_s"],
        "model_load_s": job["model_load_s"],
        "first_batch_s": job["first_batch_s"] - job["model_load_s"],
    }
    parts["other_s"] = max(0.0, first - sum(parts.values()))  # scheduling the actor, handing the batch back
    figures = {"first_output_s": first, "command_exit_s": total, **parts,
               "actor_process_s": job["worker_process_s"], "actor_imports_s": job["worker_init_s"]}
    notes = ["first output: `python -m jobs.cli render` (2 rows, tiny SD 64x64, 2 steps, the tiny catalog with its "
             "safety checker) in a fresh process, until its first PNG appears under OUT",
             "parts from the same run's own start-up record (OUT/runs/<run>.json): command = Python and the CLI's "
             "imports; Ray start; the driver's manifest and id checks; actor start = its worker process starting "
             f"({job['worker_process_s']:.1f} s) and importing torch, diffusers and the renderer "
             f"({job['worker_init_s']:.1f} s); model load; the first batch's render and write; other = the rest "
             "(scheduling the actor, handing results back)"]
    return section_result("(h) start-up: command to first output, 2-row job", figures, {k: "s" for k in figures},
                          [target("first_output_s", first, "<=", 10.0, "≤ 10 s")], {"rows": 2}, notes,
                          {"kind": "stacked", "title": "(h) command to first output (s)", "ylabel": "s",
                           "x": ["start-up"], "series": {k[:-2].replace("_", " "): [parts[k]] for k in parts}})
