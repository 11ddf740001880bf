"""Resume: a driver killed with SIGKILL mid-job, then the same command again."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections import Counter

import pyarrow.parquet as pq
import pytest

from helpers import write_manifest
from storage.fs import list_files
from storage.results import _read_parts, log_dir, read_results, results_dir

pytestmark = pytest.mark.timeout(400)

ROWS = 40


def persisted_rows(out: str) -> int:
    table = _read_parts(out)
    return 0 if table is None else table.num_rows


def test_resume_after_sigkill(tmp_path, tiny_catalog, ray_cluster):
    records = [{"id": f"row-{i:03d}", "prompt": f"scene {i}", "num_inference_steps": 4} for i in range(ROWS)]
    records[7]["num_inference_steps"] = 0  # fails every time: retried on resume, listed once
    manifest = write_manifest(str(tmp_path / "m.parquet"), records)
    out = str(tmp_path / "out")
    cmd = [sys.executable, "-m", "jobs.cli", "render", manifest, "--out", out, "--catalog", tiny_catalog,
           "--address", ray_cluster, "--workers", "1", "--batch-size", "2", "--results-flush-rows", "2",
           "--torch-threads", "1"]
    first = subprocess.Popen(cmd, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 240
        while persisted_rows(out) < 10:
            assert first.poll() is None, "the job ended before it could be killed"
            assert time.monotonic() < deadline, "no progress"
            time.sleep(0.05)
        os.killpg(first.pid, signal.SIGKILL)
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    before = read_results(out)
    done_before = {r["id"] for r in before.to_pylist() if r["status"] == "ok"}
    assert 8 <= len(done_before) < ROWS - 1, "the kill must land mid-job"

    second = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert second.returncode == 3, second.stderr[-3000:]  # the one bad row failed: rows-failed exit status
    assert f"{len(done_before)} skipped" in second.stdout

    after = read_results(out)
    counts = Counter(after["id"].to_pylist())
    assert len(counts) == ROWS and set(counts.values()) == {1}
    statuses = Counter(after["status"].to_pylist())
    assert statuses == {"ok": ROWS - 1, "failed": 1}
    # Rows already ok were not rendered again: the second run's parts (named by its run id) hold none of them.
    by_run: dict[str, set[str]] = {}
    for uri in list_files(log_dir(out), suffix=".parquet"):
        run_id = os.path.basename(uri)[len("part-"):].rsplit("-", 1)[0]
        by_run.setdefault(run_id, set()).update(pq.read_table(uri)["id"].to_pylist())
    assert len(by_run) == 2
    first_run, second_run = sorted(by_run)
    assert done_before <= by_run[first_run]
    assert not (by_run[second_run] & done_before)
    assert by_run[second_run] | done_before == {r["id"] for r in records}
    # The finished run compacted OUT/results/: any Parquet reader sees one row per id there, the log hidden.
    import pandas as pd

    frame = pd.read_parquet(results_dir(out))
    assert len(frame) == ROWS and frame["id"].is_unique and frame["seed"].dtype == "int64"
    assert Counter(frame["status"]) == {"ok": ROWS - 1, "failed": 1}
