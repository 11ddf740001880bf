"""Batch-job throughput on the tiny catalog: rows/s of a large manifest, and what batching buys.

Run on demand (`make bench` or `python -m bench.throughput --rows 2000`); prints figures and ratios
measured in this one run. The tiny models are noise generators: the figures measure renderfleet's
overhead around the pipeline, not a real model.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")

import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402


def manifest(path: str, rows: int) -> str:
    table = pa.table({
        "id": [f"bench-{i:07d}" for i in range(rows)],
        "prompt": [f"benchmark scene {i % 97}" for i in range(rows)],
        "num_inference_steps": pa.array([2] * rows, pa.int64()),
    })
    pq.write_table(table, path)
    return path


def main() -> None:
    from jobs.render import RenderJob, resolve_catalog, run

    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--rows", type=int, default=2000)
    p.add_argument("--compare-rows", type=int, default=200, help="rows for the batch-size comparison")
    p.add_argument("--workers", type=int)
    p.add_argument("--catalog")
    args = p.parse_args()
    catalog = resolve_catalog(args.catalog)
    work = tempfile.mkdtemp(prefix="rf-bench-")
    try:
        figures = {}
        for label, rows, batch in (("batch 1", args.compare_rows, 1), ("batch 8", args.compare_rows, 8),
                                   (f"{args.rows} rows, batch 8", args.rows, 8)):
            m = manifest(os.path.join(work, f"m-{rows}.parquet"), rows)
            report = run(RenderJob(m, os.path.join(work, label.replace(" ", "-").replace(",", "")), catalog=catalog,
                                   workers=args.workers, batch_size=batch, results_flush_s=30))
            figures[label] = report
            print(f"{label}: {report.rows_per_s:.2f} rows/s after the first output, {report.images_per_s:.2f} images/s "
                  f"({report.elapsed_s:.1f} s, {report.counts})")
        ratio = figures["batch 8"].rows_per_s / max(figures["batch 1"].rows_per_s, 1e-9)
        print(f"batching gain (batch 8 / batch 1, steady rows/s): {ratio:.2f}x")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
