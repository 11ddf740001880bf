"""The results dataset: one row per manifest row, appended as Parquet parts under OUT/results/.

Parts are written whole (atomic rename locally, one PUT on S3), so a killed job leaves
only complete files. A row may appear more than once (a retried failure, or a kill
between an output and its results row); readers deduplicate, preferring final rows.
"""

from __future__ import annotations

import io
import os
import secrets
import time
from collections import Counter
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from storage.fs import join, list_files, read_bytes, write_bytes

FINAL_STATUSES = ("ok", "filtered")
STATUSES = ("ok", "failed", "filtered")

RESULT_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("task", pa.string()),
        ("status", pa.string()),
        ("output_uri", pa.string()),
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
    ]
)


def results_dir(out: str) -> str:
    return join(out, "results")


def new_run_id() -> str:
    """Sortable by start time, unique across concurrent runs."""
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + secrets.token_hex(3)


@dataclass
class ResultsWriter:
    """Buffers result rows and writes them as whole Parquet parts, by count or by age."""

    out: str
    run_id: str = field(default_factory=new_run_id)
    flush_rows: int = 1000
    flush_s: float = 10.0
    _buffer: list[pa.Table] = field(default_factory=list, init=False)
    _buffered: int = field(default=0, init=False)
    _seq: int = field(default=0, init=False)
    _last_flush: float = field(default_factory=time.monotonic, init=False)

    def add(self, table: pa.Table) -> None:
        if table.num_rows:
            self._buffer.append(table)
            self._buffered += table.num_rows
        if self._buffered >= self.flush_rows or time.monotonic() - self._last_flush >= self.flush_s:
            self.flush()

    def flush(self) -> None:
        self._last_flush = time.monotonic()
        if not self._buffered:
            return
        table = pa.concat_tables(self._buffer, promote_options="permissive")
        sink = io.BytesIO()
        pq.write_table(table, sink)
        write_bytes(join(results_dir(self.out), f"part-{self.run_id}-{self._seq:06d}.parquet"), sink.getvalue())
        self._seq += 1
        self._buffer, self._buffered = [], 0


def _read_parts(out: str) -> pa.Table | None:
    parts = [u for u in list_files(results_dir(out), suffix=".parquet") if os.path.basename(u).startswith("part-")]
    tables = []
    for uri in sorted(parts, key=os.path.basename):
        tables.append(pq.read_table(io.BytesIO(read_bytes(uri))))
    if not tables:
        return None
    return pa.concat_tables(tables, promote_options="permissive")


def read_results(out: str) -> pa.Table:
    """All results under OUT, one row per id: the latest final row, else the latest row."""
    table = _read_parts(out)
    if table is None:
        return RESULT_SCHEMA.empty_table()
    # Sort keys live in a table of their own, so no user column name can collide with them.
    keys = pa.table({
        "id": table["id"],
        "final": pc.is_in(table["status"], value_set=pa.array(FINAL_STATUSES)),
        "order": pa.array(range(table.num_rows), pa.int64()),
    })
    ranked = pc.sort_indices(keys, sort_keys=[("id", "ascending"), ("final", "descending"), ("order", "descending")])
    ids = keys["id"].take(ranked).combine_chunks()
    if len(ids) > 1:
        first = pa.concat_arrays([pa.array([True]), pc.not_equal(ids[1:], ids[:-1]).cast(pa.bool_())])
    else:
        first = pa.array([True] * len(ids), pa.bool_())
    best = ranked.filter(first)
    return table.take(best.take(pc.sort_indices(best)))


def finished_ids(out: str) -> pa.Array:
    """Ids that need no more work: status ok or filtered."""
    table = read_results(out)
    done = table.filter(pc.is_in(table["status"], value_set=pa.array(FINAL_STATUSES)))
    return done["id"].combine_chunks() if done.num_rows else pa.array([], pa.string())


def error_code(error: str | None) -> str:
    """The reason part of an `code: detail` error string."""
    return (error or "unknown").split(":", 1)[0].strip() or "unknown"


@dataclass(frozen=True)
class Summary:
    """Counts by status and failures by reason."""

    total: int
    by_status: dict[str, int]
    failures: dict[str, int]


def summarize(out: str) -> Summary:
    table = read_results(out)
    statuses = Counter(table["status"].to_pylist())
    failed = table.filter(pc.equal(table["status"], "failed"))
    reasons = Counter(error_code(e) for e in failed["error"].to_pylist())
    return Summary(total=table.num_rows, by_status=dict(statuses), failures=dict(reasons.most_common()))
