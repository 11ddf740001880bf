"""Results writes against a store that really fails (a results folder replaced by a file, an S3 server
refusing writes): rows stay buffered, writes are retried with jittered backoff, and past the deadline
the writer says what was saved. Works as root, where a read-only chmod would not stop a write."""

from __future__ import annotations

import os
import random
import threading
import time
from collections import Counter
from collections.abc import Callable

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from batch_faults_kit import results_folder_blocked
from storage.fs import Backoff, list_files, stray_temp_files
from storage.results import (RESULT_SCHEMA, JobStopped, ResultsUnavailable, ResultsWriter, _read_parts, read_results,
                             remove_stray_parts, results_dir)

pytestmark = pytest.mark.timeout(120)

FAST = Backoff(first_s=0.02, cap_s=0.1)  # real backoff, scaled down so a test takes a second


def rows(*ids: str) -> pa.Table:
    return pa.Table.from_pylist([{"id": i, "status": "ok"} for i in ids], schema=RESULT_SCHEMA)


def when(condition: Callable[[], bool], action: Callable[[], None], timeout_s: float = 60) -> threading.Thread:
    """Runs `action` in a thread as soon as `condition` holds (polled): faults keyed to counts, not to sleeps."""
    def watch() -> None:
        deadline = time.monotonic() + timeout_s
        while not condition():
            if time.monotonic() > deadline:
                return
            time.sleep(0.005)
        action()

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


def assert_each_once(out: str, ids: list[str]) -> None:
    raw = _read_parts(out)
    assert raw is not None
    assert Counter(raw["id"].to_pylist()) == Counter(ids), "a row was lost or recorded twice"
    assert sorted(read_results(out)["id"].to_pylist()) == sorted(ids)


def test_backoff_grows_exponentially_with_jitter_and_a_cap():
    backoff = Backoff(first_s=1.0, cap_s=8.0, rng=random.Random(7))
    delays = [backoff.delay(n) for n in range(6)]
    for n, d in enumerate(delays):
        full = min(8.0, 2.0**n)
        assert full / 2 <= d <= full
    assert len({round(d / min(8.0, 2.0**n), 6) for n, d in enumerate(delays)}) > 1, "no jitter"
    assert backoff.delay(10_000) <= 8.0


def test_add_keeps_rows_while_the_store_fails_and_writes_them_once_it_is_back(tmp_path):
    writer = ResultsWriter(str(tmp_path), flush_rows=1, deadline_s=60, backoff=FAST)
    writer.add(rows("a"))
    ids = ["a"]
    with results_folder_blocked(tmp_path) as restore:
        n = 0
        while writer.failed_attempts < 4:  # add never waits: it retries when the backoff allows
            n += 1
            ids.append(f"b{n}")
            writer.add(rows(ids[-1]))
            time.sleep(0.005)
        assert writer.failing and writer.buffered == len(ids) - 1
        restore()
        writer.flush()
    assert not writer.failing and writer.buffered == 0 and writer.rows_written == len(ids)
    assert_each_once(str(tmp_path), ids)
    # The retried part kept its number: parts are numbered without gaps.
    names = sorted(os.path.basename(u) for u in list_files(results_dir(str(tmp_path)), suffix=".parquet"))
    assert [n.rsplit("-", 1)[1] for n in names] == ["000000.parquet", "000001.parquet"]


def test_flush_retries_until_the_store_returns(tmp_path):
    writer = ResultsWriter(str(tmp_path), flush_rows=100, deadline_s=60, backoff=FAST)
    writer.add(rows("a", "b", "c"))
    with results_folder_blocked(tmp_path) as restore:
        when(lambda: writer.failed_attempts >= 3, restore)
        started = time.monotonic()
        writer.flush()
    assert writer.failed_attempts >= 3 and time.monotonic() - started < 60
    assert_each_once(str(tmp_path), ["a", "b", "c"])


def test_past_the_deadline_flush_raises_with_what_was_saved_and_keeps_the_rows(tmp_path):
    writer = ResultsWriter(str(tmp_path), flush_rows=2, deadline_s=0.5, backoff=FAST)
    writer.add(rows("a", "b"))  # written
    with results_folder_blocked(tmp_path) as restore:
        writer.add(rows("c"))
        started = time.monotonic()
        with pytest.raises(ResultsUnavailable) as caught:
            writer.flush()
        waited = time.monotonic() - started
        e = caught.value
        assert 0.5 <= waited < 30
        assert e.recorded == 2 and e.unrecorded == 1 and e.attempts >= 3
        assert isinstance(e.last_error, OSError) and e.where == results_dir(str(tmp_path))
        assert "2 rows recorded, 1 not" in str(e)
        restore()
        writer.flush()  # nothing was dropped: the same writer saves the rest
    assert_each_once(str(tmp_path), ["a", "b", "c"])


def test_past_the_deadline_add_raises_instead_of_buffering_forever(tmp_path):
    writer = ResultsWriter(str(tmp_path), flush_rows=1, deadline_s=0.3, backoff=FAST)
    with results_folder_blocked(tmp_path):
        started = time.monotonic()
        with pytest.raises(ResultsUnavailable) as caught:
            for i in range(100_000):
                writer.add(rows(f"r{i}"))
                time.sleep(0.002)
        assert time.monotonic() - started >= 0.3
        assert caught.value.recorded == 0 and caught.value.unrecorded == writer.buffered == i + 1


def test_s3_refusing_writes_then_accepting_them_again(s3_server, monkeypatch):
    """The server itself refuses (credentials rotated under the job: 403 SignatureDoesNotMatch, which boto does
    not retry). SeaweedFS recreates a removed bucket on the next PUT, so a removed bucket cannot fail a write here."""
    out = f"{s3_server.create_bucket('results-retry')}/run"
    writer = ResultsWriter(out, flush_rows=100, deadline_s=0.5, backoff=FAST)
    writer.add(rows("a"))
    writer.flush()
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "rotated-" + s3_server.secret_key)
    writer.add(rows("b", "c"))
    with pytest.raises(ResultsUnavailable, match="SignatureDoesNotMatch"):
        writer.flush()
    assert writer.buffered == 2 and writer.rows_written == 1
    writer.deadline_s = 60
    when(lambda: writer.failed_attempts >= 6, lambda: os.environ.update(AWS_SECRET_ACCESS_KEY=s3_server.secret_key))
    writer.flush()
    assert_each_once(out, ["a", "b", "c"])


def test_stray_temporary_parts_are_removed_only_when_ours_and_older_than_the_run(tmp_path):
    folder = tmp_path / "results"
    folder.mkdir()
    hexa = "0123456789abcdef" * 2
    old_ours = folder / f".part-20260101T000000Z-aaaaaa-000003.parquet.{hexa}.tmp"
    new_ours = folder / f".part-20260101T000000Z-bbbbbb-000000.parquet.{hexa}.tmp"
    old_other = folder / f".notes.txt.{hexa}.tmp"
    old_unlike = folder / ".part-x.parquet.tmp"
    kept_part = folder / "part-20260101T000000Z-aaaaaa-000000.parquet"
    for f in (old_ours, new_ours, old_other, old_unlike):
        f.write_bytes(b"partial")
    pq.write_table(rows("a"), kept_part)
    started = time.time()
    for f in (old_ours, old_other, old_unlike, kept_part):
        os.utime(f, (started - 600, started - 600))
    os.utime(new_ours, (started + 5, started + 5))  # a live writer's, written after this run began
    assert stray_temp_files(str(folder), older_than=started) == sorted([str(old_ours), str(old_other)])
    assert remove_stray_parts(str(tmp_path), started) == [str(old_ours)]
    assert sorted(p.name for p in folder.iterdir()) == sorted(p.name for p in (new_ours, old_other, old_unlike, kept_part))
    assert read_results(str(tmp_path))["id"].to_pylist() == ["a"]
    assert remove_stray_parts(str(tmp_path / "missing"), started) == []
    assert remove_stray_parts("s3://bucket/out", started) == []


def test_job_stopped_says_what_was_saved_what_was_not_and_how_to_resume(tmp_path):
    cause = ResultsUnavailable("/o/results", recorded=12, unrecorded=5, failing_s=301, attempts=9,
                               last_error=FileExistsError(17, "File exists", "/o/results"))
    stopped = JobStopped("/o", cause, earlier=10, outputs=16, rendered=17, pending=50)
    text = stopped.explain("renderfleet render m.parquet --out /o")
    assert "\n" not in text and "Traceback" not in text
    for part in ("for 301 s", "9 attempts", "FileExistsError", "22 results recorded (12 in this run, 10 finished in earlier runs)",
                 "16 outputs written under /o", "results of 5 rendered rows", "33 rows not rendered yet",
                 "resume with: renderfleet render m.parquet --out /o"):
        assert part in text, part
    assert stopped.exit_code not in (0, 1, 2, 130)
