"""Sections (c) and (d): fan-out over a latency-bound stand-in renderer, and the driver's memory and speed
over large manifests with a no-op renderer, fresh and resumed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from bench.common import (ROOT, Ctx, run_job, section_result, standin_catalog, start_ray, stop_ray, target,
                          write_manifest)


def window_rate(out: Path) -> tuple[float, float]:
    """(rows/s, seconds) while every worker was producing: from the last worker's first output to the first
    worker's last, read from output files' times; (0, 0) when that window is empty."""
    from storage.results import read_results

    table = read_results(str(out)).to_pydict()
    stamps: dict[str, list[float]] = {}
    for uri, worker in zip(table["output_uri"], table["worker"]):
        if uri:
            stamps.setdefault(worker, []).append(os.stat(out / uri).st_mtime)
    if not stamps:
        return 0.0, 0.0
    lo = max(min(v) for v in stamps.values())
    hi = min(max(v) for v in stamps.values())
    inside = sum(1 for v in stamps.values() for t in v if lo < t <= hi)
    return (inside / (hi - lo), hi - lo) if hi > lo and inside else (0.0, 0.0)


def section_c(ctx: Ctx) -> dict[str, Any]:
    workers = ctx.scale_workers or ctx.pick((1, 2, 4, 8), (1, 2))
    ms = ctx.pick(40.0, 5.0)
    batch = ctx.pick(8, 4)
    per_worker = ctx.pick(250, 16)
    catalog = standin_catalog(ctx.work / "standin", ms)
    start_ray(num_cpus=os.cpu_count(), standin=True)
    rates: dict[int, float] = {}
    windows: dict[int, float] = {}
    reported: dict[int, float] = {}
    for n in workers:
        manifest = write_manifest(ctx.work / f"c-{n}.parquet", per_worker * n, 64)
        out = ctx.work / f"job-{n}"
        report = run_job(manifest, out, catalog, workers=n, batch_size=batch, torch_threads=1)
        rate, span = window_rate(out)
        reported[n] = report.rows_per_s
        rates[n], windows[n] = (rate, span) if rate else (report.rows_per_s, 0.0)
    stop_ray()
    base = rates[workers[0]] / workers[0]
    eff = {n: rates[n] / (n * base) if base else 0.0 for n in workers}
    figures = {**{f"efficiency_{n}": eff[n] for n in workers}, **{f"rows_per_s_{n}": rates[n] for n in workers},
               **{f"window_s_{n}": windows[n] for n in workers}}
    units = {k: ("x" if k.startswith("eff") else "s" if k.startswith("window") else "rows/s") for k in figures}
    top = max(workers)
    ideal = 1000.0 / ms
    notes = [f"stand-in renderer: sleeps {ms:g} ms per image (the CPU stays free, as with an accelerator), "
             f"batch {batch}, 64x64 outputs, {per_worker} rows per worker; ideal {ideal:.0f} rows/s per worker",
             "throughput: rows per second while every worker was producing (output file times), since actors start "
             "one after another on a small machine; job-reported steady rows/s: "
             + ", ".join(f"{n}: {reported[n]:.1f}" for n in workers)]
    return section_result("(c) fan-out scaling with a latency-bound stand-in renderer", figures, units,
                          [target(f"efficiency_{top}", eff[top], ">=", 0.9, f"≥ 0.9 at {top} workers")],
                          {"workers": list(workers), "ms_per_image": ms, "batch": batch, "rows_per_worker": per_worker},
                          notes, {"kind": "line", "title": "(c) throughput(N) / (N x throughput(1))", "xlabel": "workers",
                                  "ylabel": "efficiency", "x": list(workers), "series": {"efficiency": [eff[n] for n in workers],
                                                                                          "target": [0.9] * len(workers)}})


def _case(manifest: str, out: Path, catalog: str, workers: int, batch: int, result: Path) -> dict[str, Any]:
    """One job in a fresh driver process (bench.driver_case), so its peak RSS is its own."""
    cmd = [sys.executable, "-m", "bench.driver_case", "--manifest", manifest, "--out", str(out), "--catalog", catalog,
           "--workers", str(workers), "--batch-size", str(batch), "--result", str(result)]
    subprocess.run(cmd, cwd=ROOT, check=True, stdout=sys.stderr, timeout=3600)
    return json.loads(result.read_text())


def finished(out: Path, manifest: str) -> None:
    """An OUT whose results record the manifest's rows as ok, as a finished earlier run leaves them; written
    directly (a resumed job reads only results to skip rows), which saves (d) a render run per size."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from storage.results import RESULT_SCHEMA, ResultsWriter

    ids = pq.read_table(manifest, columns=["id"])["id"].combine_chunks()
    given = {"id": ids, "status": pa.array(["ok"] * len(ids)), "task": pa.array(["image"] * len(ids))}
    table = pa.table({f.name: given.get(f.name, pa.nulls(len(ids), f.type)) for f in RESULT_SCHEMA}, schema=RESULT_SCHEMA)
    writer = ResultsWriter(str(out), flush_rows=len(ids) + 1)
    writer.add(table)
    writer.flush()


def section_d(ctx: Ctx) -> dict[str, Any]:
    small, large = ctx.d_rows or ctx.pick((10_000, 60_000), (200, 400))  # 60k: above LOCAL_ROWS, so the shuffles run
    batch = ctx.pick(500, 50)
    workers = 2
    catalog = standin_catalog(ctx.work / "noop", 0.0)
    cases: dict[str, dict[str, Any]] = {}
    for n in (small, large):
        manifest = write_manifest(ctx.work / f"d-{n}.parquet", n, 8)
        half = write_manifest(ctx.work / f"d-{n}-half.parquet", n // 2, 8)
        cases[f"fresh_{n}"] = _case(manifest, ctx.work / f"fresh-{n}", catalog, workers, batch, ctx.work / f"fresh-{n}.json")
        finished(ctx.work / f"resumed-{n}", half)
        cases[f"resumed_{n}"] = _case(manifest, ctx.work / f"resumed-{n}", catalog, workers, batch,
                                      ctx.work / f"resumed-{n}.json")
        if cases[f"resumed_{n}"]["skipped"] != n // 2:
            raise RuntimeError(f"(d) resumed {n}: skipped {cases[f'resumed_{n}']['skipped']} rows, not {n // 2}")
    figures: dict[str, float] = {}
    targets = []
    for kind in ("fresh", "resumed"):
        a, b = cases[f"{kind}_{small}"], cases[f"{kind}_{large}"]
        figures[f"{kind}_rss_ratio"] = b["peak_rss_mb"] / a["peak_rss_mb"]
        figures[f"{kind}_rate_ratio"] = b["rows_per_s"] / a["rows_per_s"] if a["rows_per_s"] else 0.0
        targets += [target(f"{kind}_rss_ratio", figures[f"{kind}_rss_ratio"], "<=", 1.5, f"≤ 1.5 ({large} vs {small} rows)"),
                    target(f"{kind}_rate_ratio", figures[f"{kind}_rate_ratio"], ">=", 0.8, "≥ 0.8 (within 20 %)")]
        for n in (small, large):
            c = cases[f"{kind}_{n}"]
            figures.update({f"{kind}_{n}_peak_rss_mb": c["peak_rss_mb"], f"{kind}_{n}_rows_per_s": c["rows_per_s"],
                            f"{kind}_{n}_elapsed_s": c["elapsed_s"]})
    units = {k: ("x" if "ratio" in k else "MB" if k.endswith("mb") else "rows/s" if k.endswith("_per_s") else "s" if k.endswith("_s") else "rows/s") for k in figures}
    notes = [f"no-op stand-in renderer (8x8 outputs, every row still finished and written), {workers} workers, batch {batch}",
             "each job in its own driver process: peak RSS is that process's ru_maxrss; rows/s is the job's steady rate",
             "resumed: the same manifest over an OUT whose results record the first half of the ids as finished "
             "(written directly, as a finished run leaves them)"]
    if large < 1_000_000:
        notes.append(f"the spec asks for 1M rows; this run used {large} (`--d-rows {small},1000000` runs 1M: no-op rows "
                     "still cost a PNG and a file each, too slow for the 15-minute budget on 2 cores)")
    return section_result("(d) driver memory and speed over large manifests (no-op renderer)", figures, units, targets,
                          {"rows": [small, large], "workers": workers, "batch": batch}, notes,
                          {"kind": "bar", "title": "(d) driver peak RSS (MB)", "ylabel": "MB",
                           "x": [f"{k} {n}" for k in ("fresh", "resumed") for n in (small, large)],
                           "series": {"peak RSS": [cases[f"{k}_{n}"]["peak_rss_mb"] for k in ("fresh", "resumed")
                                                   for n in (small, large)]}})
