"""Block-level bookkeeping for results and manifest ids, in Arrow only.

The same functions run on one table (status, report) and on each hash partition of a cluster-wide
shuffle (resume checks, compaction), so a single machine and a cluster agree row for row.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

FINAL_STATUSES = ("ok", "filtered")
RANK = "_renderfleet_rank"  # final bit, then file order, then row order: the highest rank of an id is its result
_FINAL_SHIFT, _FILE_SHIFT = 62, 38  # 2^24 files, 2^38 rows per file
SHOWN_IDS = 20  # duplicate ids an error message lists


def ranked(table: pa.Table, file_order: int, first_row: int = 0) -> pa.Table:
    """`table` (rows of one results file, starting at `first_row`) with its RANK column."""
    if not 0 <= file_order < 1 << (_FINAL_SHIFT - _FILE_SHIFT):
        raise ValueError(f"file order {file_order} out of range")
    final = pc.is_in(table["status"], value_set=pa.array(FINAL_STATUSES)).to_numpy(zero_copy_only=False)
    rank = (final.astype(np.int64) << _FINAL_SHIFT) + (file_order << _FILE_SHIFT) \
        + np.arange(first_row, first_row + table.num_rows, dtype=np.int64)
    return table.append_column(RANK, pa.array(rank, pa.int64()))


def best_rows(table: pa.Table) -> pa.Table:
    """One row per id, the one with the highest rank (a final row over any other, then the latest),
    in the order the rows came; the RANK column is dropped."""
    if table.num_rows <= 1:
        return table.drop_columns([RANK])
    keys = pa.table({"id": table["id"], RANK: table[RANK]})
    order = pc.sort_indices(keys, sort_keys=[("id", "ascending"), (RANK, "descending")])
    ids = keys["id"].take(order).combine_chunks()
    first = pa.concat_arrays([pa.array([True]), pc.not_equal(ids[1:], ids[:-1]).fill_null(True)])
    first = pc.or_(first, pc.is_null(ids))  # null ids are never merged with each other
    best = order.filter(first)
    return table.take(best.take(pc.sort_indices(best))).drop_columns([RANK])


def conform(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """`table` with exactly `schema`'s columns: missing ones null, others cast (older parts lack newer columns)."""
    columns = [table[f.name].cast(f.type) if f.name in table.column_names else pa.nulls(table.num_rows, f.type)
               for f in schema]
    return pa.Table.from_arrays(columns, schema=schema)


# ----------------------------------------------------------------------------- manifest ids

MANIFEST, FINISHED = 1, 0  # the `side` of an id row in `id_report`'s input


@dataclass
class IdReport:
    """What one partition (or the whole manifest) says about its ids."""

    nulls: int = 0
    empties: int = 0
    duplicates: dict[str, int] = field(default_factory=dict)  # up to SHOWN_IDS of them, smallest ids first
    duplicate_total: int = 0
    finished: int = 0  # distinct manifest ids that already have a final result

    def merge(self, other: IdReport) -> IdReport:
        shown = dict(sorted({**self.duplicates, **other.duplicates}.items())[:SHOWN_IDS])
        return IdReport(self.nulls + other.nulls, self.empties + other.empties, shown,
                        self.duplicate_total + other.duplicate_total, self.finished + other.finished)

    def problem(self) -> str | None:
        """The message a manifest with these ids is refused with, or None."""
        if self.nulls:
            return f"manifest has {self.nulls} rows with a null 'id'"
        if self.empties:
            return "manifest has rows with an empty 'id'"
        if self.duplicate_total:
            shown = ", ".join(f"{v!r} (x{n})" for v, n in self.duplicates.items())
            more = f" and {self.duplicate_total - len(self.duplicates)} more" \
                if self.duplicate_total > len(self.duplicates) else ""
            return f"manifest has {self.duplicate_total} duplicate ids: {shown}{more}"
        return None

    def as_row(self) -> dict:
        return {"nulls": self.nulls, "empties": self.empties, "duplicate_ids": list(self.duplicates),
                "duplicate_counts": list(self.duplicates.values()), "duplicate_total": self.duplicate_total,
                "finished": self.finished}

    @classmethod
    def from_row(cls, row: dict) -> IdReport:
        return cls(row["nulls"], row["empties"], dict(zip(row["duplicate_ids"], row["duplicate_counts"])),
                   row["duplicate_total"], row["finished"])


def id_report(table: pa.Table) -> IdReport:
    """Checks the ids of one partition: columns `id` and `side` (MANIFEST rows, FINISHED result ids)."""
    manifest = table.filter(pc.equal(table["side"], MANIFEST))["id"]
    finished = table.filter(pc.equal(table["side"], FINISHED))["id"]
    valid = manifest.filter(pc.is_valid(manifest))
    counts = pa.table({"id": valid}).group_by("id").aggregate([("id", "count")])
    dupes = counts.filter(pc.greater(counts["id_count"], 1)).sort_by("id")
    distinct = counts["id"]
    return IdReport(
        nulls=manifest.null_count,
        empties=pc.sum(pc.equal(pc.utf8_length(valid), 0)).as_py() or 0,
        duplicates=dict(zip(dupes["id"].to_pylist()[:SHOWN_IDS], dupes["id_count"].to_pylist()[:SHOWN_IDS])),
        duplicate_total=dupes.num_rows,
        finished=(pc.sum(pc.is_in(distinct, value_set=finished.combine_chunks())).as_py() or 0) if len(finished) else 0,
    )


def id_rows(ids: pa.Array | pa.ChunkedArray, side: int) -> pa.Table:
    """The `id_report` input for one side."""
    return pa.table({"id": ids, "side": pa.array(np.full(len(ids), side, np.int8))})
