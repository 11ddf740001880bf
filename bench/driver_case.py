"""One batch job in this (fresh) process, for section (d): prints nothing, writes its figures as JSON.

Peak RSS is this driver process's own ru_maxrss; Ray's workers are other processes and not counted.
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from pathlib import Path

from bench.common import run_job, start_ray, stop_ray


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    for name in ("--manifest", "--out", "--catalog", "--result"):
        p.add_argument(name, required=True)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=500)
    args = p.parse_args()
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    start_ray(standin=True)
    started = time.perf_counter()
    report = run_job(args.manifest, Path(args.out), args.catalog, args.workers, args.batch_size, torch_threads=1,
                     flush_rows=10_000)
    elapsed = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    stop_ray()
    Path(args.result).write_text(json.dumps({
        "peak_rss_mb": peak, "rss_before_mb": rss_before, "rows_per_s": report.rows_per_s, "elapsed_s": elapsed,
        "rendered": sum(report.counts.values()), "skipped": report.skipped, "total": report.total}))


if __name__ == "__main__":
    main()
