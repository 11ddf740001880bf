"""The results dataset: one row per manifest row, appended as Parquet parts under OUT/results/_log/ and
compacted into OUT/results/results.parquet (one row per id) when a run ends.

Parts are written whole (atomic rename locally, one PUT on S3), so a killed job leaves
only complete files. A row may appear more than once (a retried failure, or a kill
between an output and its results row); readers deduplicate, preferring final rows.
A failing store (S3 down, a read-only disk) does not lose rows: they stay buffered and
the write is retried with backoff until a deadline, then ResultsUnavailable says what was saved.
"""

from __future__ import annotations

import io
import json
import logging
import os
import secrets
import time
from collections import Counter
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from storage.fs import Backoff, delete, is_remote, join, list_files, read_bytes, store_errors, stray_temp_files, write_bytes
from storage.ledger import FINAL_STATUSES, best_rows, ranked
from storage.result_params import PARAM_FIELDS, param_values  # noqa: F401 - part of this module's API

log = logging.getLogger(__name__)

STATUSES = ("ok", "failed", "filtered")

RESULT_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("task", pa.string()),
        ("status", pa.string()),
        ("output_uri", pa.string()),  # relative to OUT: open it with absolute_uri(OUT, output_uri)
        ("sha256", pa.string()),
        ("error", pa.string()),
        ("seed", pa.int64()),
        ("model", pa.string()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("render_s", pa.float64()),
        ("worker", pa.string()),
        ("model_loads", pa.int32()),  # checkpoints the actor loaded while rendering this row's batch
        ("filter_reason", pa.string()),  # why a `filtered` row was stopped (prompt_policy: RULE, nsfw_output)
        ("nsfw", pa.bool_()),  # the output safety checker's verdict (null where none ran)
        ("safety_action", pa.string()),  # block | blur | flag, for flagged outputs
        ("watermark", pa.string()),  # embedded | skipped_small | disabled | not_applicable
        ("c2pa", pa.string()),  # signed | unsigned: why | not_applicable
        ("rerendered", pa.bool_()),  # its output existed: an earlier render was lost (a node, a killed driver) unrecorded
        *PARAM_FIELDS,
    ]
)


COMPACTED = "results.parquet"  # OUT/results/results.parquet: one row per id, rewritten whole when a run ends
LOG_DIR = "_log"  # OUT/results/_log/part-*.parquet: what runs append; `_` hides it from dataset readers


def results_dir(out: str) -> str:
    """OUT/results/: the compacted table, what pandas, Arrow and Spark read as a dataset; runs append under _log/."""
    return join(out, "results")


def log_dir(out: str) -> str:
    return join(out, "results", LOG_DIR)


def relative_uri(out: str, uri: str | None) -> str | None:
    """An output's URI as the results table stores it: relative to OUT (`image/ab/id.png`), so a moved or
    copied OUT keeps working; a URI outside OUT stays as it is."""
    if not uri:
        return uri
    base = join(out).rstrip("/") + "/"
    target = uri if is_remote(uri) else os.path.abspath(uri)
    return target[len(base):] if target.startswith(base) else uri


def absolute_uri(out: str, relative: str | None) -> str | None:
    """Where a results row's `output_uri` lies: joined onto OUT (local folder or s3:// prefix). Absolute URIs
    (rows written before output URIs became relative) are returned as they are."""
    if not relative:
        return None
    if is_remote(relative) or os.path.isabs(relative) or "://" in relative:
        return relative
    return join(out, relative)


def new_run_id() -> str:
    """Sortable by start time, unique across concurrent runs."""
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + secrets.token_hex(3)


DEFAULT_DEADLINE_S = 600.0  # how long failing results writes are retried before the job stops


def describe(error: BaseException) -> str:
    """One line for an exception: its type and message."""
    return f"{type(error).__name__}: {error}"


class ResultsUnavailable(RuntimeError):
    """Results parts could not be written for the whole deadline; the unwritten rows are still buffered."""

    def __init__(self, where: str, recorded: int, unrecorded: int, failing_s: float, attempts: int,
                 last_error: BaseException):
        self.where, self.recorded, self.unrecorded = where, recorded, unrecorded
        self.failing_s, self.attempts, self.last_error = failing_s, attempts, last_error
        super().__init__(
            f"cannot write results to {where}: {attempts} attempts over {failing_s:.0f} s failed "
            f"(last: {describe(last_error)}); {recorded} rows recorded, {unrecorded} not"
        )


class JobStopped(RuntimeError):
    """A job stopped cleanly because its results could not be recorded; rerunning it resumes.

    It lives here, beside its cause, so the command line can catch it without importing Ray.
    """

    exit_code = 75  # EX_TEMPFAIL: a temporary failure, try again

    def __init__(self, out: str, cause: ResultsUnavailable, earlier: int, outputs: int, rendered: int, pending: int):
        self.out, self.cause, self.earlier = out, cause, earlier
        self.outputs, self.rendered, self.pending = outputs, rendered, pending
        super().__init__(self.explain())

    def explain(self, resume: str | None = None) -> str:
        """One paragraph: why it stopped, what was saved, what was not, and how to resume."""
        c = self.cause
        how = f"resume with: {resume}" if resume else "resume by running the same job again with the same out"
        return (
            f"error: the job stopped because its results could not be written to {c.where} for {c.failing_s:.0f} s "
            f"({c.attempts} attempts; last error: {describe(c.last_error)}). Saved: {self.earlier + c.recorded} "
            f"results recorded ({c.recorded} in this run, {self.earlier} finished in earlier runs) and "
            f"{self.outputs} outputs written under {self.out} in this run. Not saved: the results of {c.unrecorded} rendered rows (any "
            f"outputs they wrote stay; those rows are rendered again on resume) and {self.pending - self.rendered} "
            f"rows not rendered yet. Once {c.where} can be written again, {how}"
        )


@dataclass
class ResultsWriter:
    """Buffers result rows and writes them as whole Parquet parts, by count or by age.

    A failed write keeps its rows buffered and is retried with jittered backoff: `add` never waits
    (rendering goes on), `flush` sleeps between attempts. After `deadline_s` of consecutive failures
    both raise ResultsUnavailable. A part gets its number only once written, so a retry rewrites the
    same part name (with any rows added since) and no row is recorded twice.
    """

    out: str
    run_id: str = field(default_factory=new_run_id)
    flush_rows: int = 1000
    flush_s: float = 10.0
    deadline_s: float = DEFAULT_DEADLINE_S
    backoff: Backoff = field(default_factory=Backoff)
    rows_written: int = field(default=0, init=False)
    failed_attempts: int = field(default=0, init=False)  # over the writer's life, for reports and tests
    _buffer: list[pa.Table] = field(default_factory=list, init=False)
    _buffered: int = field(default=0, init=False)
    _seq: int = field(default=0, init=False)
    _last_flush: float = field(default_factory=time.monotonic, init=False)
    _failing_since: float | None = field(default=None, init=False)
    _failures: int = field(default=0, init=False)  # consecutive, since _failing_since
    _retry_at: float = field(default=0.0, init=False)
    _last_error: BaseException | None = field(default=None, init=False)

    @property
    def buffered(self) -> int:
        """Rows added but not yet written."""
        return self._buffered

    @property
    def failing(self) -> bool:
        return self._failing_since is not None

    def add(self, table: pa.Table) -> None:
        """Buffers rows and writes a part when one is due; never waits for a failing store."""
        if table.num_rows:
            self._buffer.append(table)
            self._buffered += table.num_rows
        if self._due() and not self._attempt() and self._expired():
            raise self._unavailable()

    def flush(self) -> None:
        """Writes every buffered row now, retrying until written; ResultsUnavailable past the deadline."""
        while not self._attempt():
            if self._expired():
                raise self._unavailable()
            assert self._failing_since is not None
            wake = min(self._retry_at, self._failing_since + self.deadline_s)
            time.sleep(max(0.0, wake - time.monotonic()))

    def try_flush(self) -> bool:
        """One write attempt that never raises for a failing store (for exit paths); True when nothing is left."""
        return self._attempt()

    def _due(self) -> bool:
        now = time.monotonic()
        if self._failing_since is not None:
            return now >= self._retry_at or self._expired()
        return self._buffered >= self.flush_rows or now - self._last_flush >= self.flush_s

    def _expired(self) -> bool:
        return self._failing_since is not None and time.monotonic() - self._failing_since >= self.deadline_s

    def _unavailable(self) -> ResultsUnavailable:
        assert self._failing_since is not None and self._last_error is not None
        return ResultsUnavailable(results_dir(self.out), self.rows_written, self._buffered,
                                  time.monotonic() - self._failing_since, self._failures, self._last_error)

    def _attempt(self) -> bool:
        """Writes the buffer as the next part; False (rows kept, retry scheduled) when the store fails."""
        self._last_flush = time.monotonic()
        if not self._buffered:
            return True
        # Building the part is not retried: a failure there is a bug, not the store.
        table = pa.concat_tables(self._buffer, promote_options="permissive")
        self._buffer = [table]
        sink = io.BytesIO()
        pq.write_table(table, sink)
        uri = join(log_dir(self.out), f"part-{self.run_id}-{self._seq:06d}.parquet")
        try:
            write_bytes(uri, sink.getvalue())
        except store_errors() as e:
            self._failed(uri, e)
            return False
        if self._failing_since is not None:
            log.warning("results written again after %d failed attempts over %.0f s: %s", self._failures,
                        time.monotonic() - self._failing_since, uri)
        self._seq += 1
        self.rows_written += self._buffered
        self._buffer, self._buffered = [], 0
        self._failing_since, self._failures, self._last_error = None, 0, None
        return True

    def _failed(self, uri: str, error: BaseException) -> None:
        now = time.monotonic()
        if self._failing_since is None:
            self._failing_since = now
        delay = self.backoff.delay(self._failures)
        self._failures += 1
        self.failed_attempts += 1
        self._retry_at = now + delay
        self._last_error = error
        log.warning("cannot write results part %s (attempt %d, failing for %.0f of %.0f s; %d rows kept): %s; "
                    "retrying in %.1f s", uri, self._failures, now - self._failing_since, self.deadline_s,
                    self._buffered, describe(error), delay)


def remove_stray_parts(out: str, started: float) -> list[str]:
    """Deletes temporary results parts that a killed writer left (ours by name, older than `started`)."""
    stray = [*stray_temp_files(results_dir(out), older_than=started, prefix="part-"),
             *stray_temp_files(results_dir(out), older_than=started, prefix=COMPACTED),
             *stray_temp_files(log_dir(out), older_than=started, prefix="part-")]
    for path in stray:
        delete(path)
    return stray


def result_files(out: str) -> list[str]:
    """Every results file, oldest first: parts older versions left directly in results/, the compacted
    table, then the log parts (sorted by name, which starts with the run's time)."""
    top, log = results_dir(out), log_dir(out)
    files = list_files(top, suffix=".parquet")
    named = lambda folder: sorted((u for u in files if os.path.dirname(u) == folder  # noqa: E731
                                   and os.path.basename(u).startswith("part-")), key=os.path.basename)
    return [*named(top), *(u for u in files if u == join(top, COMPACTED)), *named(log)]


def legacy_parts(out: str) -> list[str]:
    """Parts an older version wrote directly into results/ (compaction folds them in and removes them)."""
    return [u for u in result_files(out) if os.path.dirname(u) == results_dir(out) and u != join(results_dir(out), COMPACTED)]


def _read_parts(out: str) -> pa.Table | None:
    """Every recorded row with its rank (later files and rows rank higher)."""
    tables = [ranked(pq.read_table(io.BytesIO(read_bytes(uri))), order) for order, uri in enumerate(result_files(out))]
    if not tables:
        return None
    return pa.concat_tables(tables, promote_options="permissive")


def read_results(out: str) -> pa.Table:
    """All results under OUT, one row per id: the latest final row, else the latest row. Reads on this
    machine: for large results read the compacted table (one row per id already) or use cluster.ledger."""
    table = _read_parts(out)
    if table is None:
        return RESULT_SCHEMA.empty_table()
    return best_rows(table)


def error_code(error: str | None) -> str:
    """The reason part of an `code: detail` error string."""
    return (error or "unknown").split(":", 1)[0].strip() or "unknown"


@dataclass(frozen=True)
class Summary:
    """Counts by status and failures by reason, the failed ids, and the manifest's size when a run recorded it."""

    total: int
    by_status: dict[str, int]
    failures: dict[str, int]
    failed_ids: tuple[str, ...] = ()
    manifest_total: int | None = None  # from the latest run summary under OUT/runs/; None when none recorded it

    @property
    def pending(self) -> int | None:
        """Manifest rows with no result yet (None when the manifest's size is unknown)."""
        return None if self.manifest_total is None else max(self.manifest_total - self.total, 0)

    def as_dict(self) -> dict:
        """The summary for machines (`renderfleet status --json`)."""
        return {"manifest_total": self.manifest_total, "results": self.total, "pending": self.pending,
                "counts": {k: self.by_status.get(k, 0) for k in STATUSES} | self.by_status,
                "reasons": self.failures, "failed_ids": list(self.failed_ids)}


def has_results(out: str) -> bool:
    """Whether OUT holds any results part (so `status` and `report` can refuse a wrong path)."""
    try:
        parts = list_files(results_dir(out), suffix=".parquet")
    except FileNotFoundError:  # a missing S3 bucket
        return False
    return any(os.path.basename(u).startswith("part-") or os.path.basename(u) == COMPACTED for u in parts)


def latest_run(out: str) -> dict | None:
    """The newest run summary under OUT/runs/ (names sort by start time), or None; an unreadable one is skipped."""
    try:
        runs = list_files(join(out, "runs"), suffix=".json")
    except FileNotFoundError:
        return None
    for uri in sorted(runs, key=os.path.basename, reverse=True):
        try:
            return json.loads(read_bytes(uri))
        except (ValueError, *store_errors()) as e:
            log.warning("skipping the run summary %s: %s", uri, describe(e))
    return None


def summarize(out: str) -> Summary:
    table = read_results(out)
    statuses = Counter(table["status"].to_pylist())
    failed = table.filter(pc.equal(table["status"], "failed"))
    reasons = Counter(error_code(e) for e in failed["error"].to_pylist())
    run = latest_run(out) or {}
    manifest_total = run.get("manifest_total")
    return Summary(total=table.num_rows, by_status=dict(statuses), failures=dict(reasons.most_common()),
                   failed_ids=tuple(sorted(failed["id"].to_pylist())),
                   manifest_total=manifest_total if isinstance(manifest_total, int) else None)
