"""Cluster-wide bookkeeping as Ray Data jobs: the manifest's id checks, skipping finished rows, and
compacting results, each hash-partitioned by id, so the driver never holds anything per row. Jobs of up
to LOCAL_ROWS rows do the same in the driver, with the same functions, since a shuffle's start-up would
cost them more than the work."""

from __future__ import annotations

import io
from collections.abc import Iterable

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import ray
from ray.data import DataContext, Dataset

from cluster.reading import read_parquet_files
from cluster.resources import TASK_CPUS

from storage.fs import atomic_output, delete, filesystem, join, read_bytes
from storage.ledger import FINAL_STATUSES, FINISHED, MANIFEST, RANK, IdReport, best_rows, conform, id_report, id_rows, ranked
from storage.results import COMPACTED, RESULT_SCHEMA, legacy_parts, read_results, result_files, results_dir

ROWS_PER_PARTITION = 1_000_000  # rows one shuffle partition holds; small jobs get one partition
MAX_PARTITIONS = 200
# Up to this many manifest rows and recorded results, the driver does the bookkeeping itself (at most a few
# MB of ids): each Ray Data shuffle costs seconds of start-up, which is most of a small job's overhead.
LOCAL_ROWS = 50_000


def partitions(rows: int) -> int:
    """Shuffle partitions for `rows` rows: more partitions only pay once there is data to spread."""
    return max(1, min(MAX_PARTITIONS, -(-rows // ROWS_PER_PARTITION)))


def _quiet() -> None:
    DataContext.get_current().enable_progress_bars = False  # the job prints its own progress


# ------------------------------------------------------------------------------ reading results


def _footers(out: str) -> tuple[list[str], pa.Schema, int]:
    """The results files, their unified schema and their total rows, from footers only."""
    uris = result_files(out)
    schemas, rows = [RESULT_SCHEMA], 0
    for uri in uris:
        meta = _metadata(uri)
        schemas.append(meta.schema.to_arrow_schema())
        rows += meta.num_rows
    return uris, pa.unify_schemas(schemas, promote_options="permissive"), rows


def _metadata(uri: str) -> pq.FileMetaData:
    fs, path = filesystem(uri)
    with fs.open_input_file(path) as f:
        return pq.ParquetFile(f).metadata


def ranked_results(out: str, columns: list[str] | None = None) -> tuple[Dataset, int, pa.Schema] | None:
    """Every recorded row under OUT (with its RANK) as a Dataset, how many rows that is, and their schema
    (without RANK); None when nothing was recorded."""
    uris, schema, rows = _footers(out)
    if not uris:
        return None
    if columns:
        schema = pa.schema([schema.field(c) for c in columns])
    fs, _ = filesystem(out)
    full = schema.append(pa.field(RANK, pa.int64()))
    ds = read_parquet_files([filesystem(u)[1] for u in uris], fs, columns,
                            shape=lambda table, order, first: conform(ranked(table, order, first), full))
    return ds, rows, schema


def _finished_ids(table: pa.Table) -> pa.Table:
    final = table.filter(pc.is_in(table["status"], value_set=pa.array(FINAL_STATUSES)))
    return id_rows(final["id"], FINISHED)


def recorded_rows(out: str) -> int:
    """Rows recorded under OUT so far (log parts and the compacted table), from footers only."""
    return _footers(out)[2]


def local_ids(manifest: pads.Dataset, out: str) -> tuple[IdReport, pa.Array]:
    """`check_ids` and the finished ids of a small job, in the driver: the id columns read once, no shuffle.
    The report is the one partition `id_report` sees, as in the distributed check."""
    table = id_rows(manifest.to_table(columns=["id"])["id"], MANIFEST)
    parts = [pq.read_table(io.BytesIO(read_bytes(uri)), columns=["id", "status"]) for uri in result_files(out)]
    finished = pa.array([], pa.string())
    if parts:
        final = _finished_ids(pa.concat_tables(parts, promote_options="permissive"))
        finished = pc.unique(final["id"].combine_chunks())
        table = pa.concat_tables([table, final], promote_options="permissive")
    return id_report(table), finished


def _drop(table: pa.Table, finished: ray.ObjectRef) -> pa.Table:
    return table.filter(pc.invert(pc.is_in(table["id"], value_set=ray.get(finished))))


def without(manifest: Dataset, finished: pa.Array) -> Dataset:
    """The manifest rows whose ids are not in `finished` (a small job's set: one object, not one per task)."""
    return manifest.map_batches(_drop, fn_kwargs={"finished": ray.put(finished)}, batch_format="pyarrow",
                                batch_size=None, num_cpus=TASK_CPUS)


def finished_ids(out: str) -> Dataset | None:
    """Ids with a final result (ok or filtered), in any results file under OUT; None when there are none."""
    found = ranked_results(out, columns=["id", "status"])
    return None if found is None else found[0].map_batches(_finished_ids, batch_format="pyarrow", batch_size=None,
                                                                    num_cpus=TASK_CPUS)


# ------------------------------------------------------------------------------- manifest checks


def _report(table: pa.Table) -> pa.Table:
    return pa.Table.from_pylist([id_report(table).as_row()])


def check_ids(manifest: Dataset, finished: Dataset | None, rows: int) -> IdReport:
    """One shuffle of the ids: nulls, empties and duplicates in the manifest, and how many of its ids
    are finished already. The driver gets one small row per partition."""
    _quiet()
    ids = manifest.select_columns(["id"]).map_batches(lambda t: id_rows(t["id"], MANIFEST),
                                                       batch_format="pyarrow", batch_size=None)
    both = ids if finished is None else ids.union(finished)
    reports = both.repartition(partitions(rows), keys=["id"]).map_batches(_report, batch_format="pyarrow",
                                                                           batch_size=None)
    total = IdReport()
    for row in reports.iter_rows():
        total = total.merge(IdReport.from_row(row))
    return total


def unfinished(manifest: Dataset, finished: Dataset | None, rows: int) -> Dataset:
    """The manifest rows without a final result: a hash-partitioned anti-join, not a set on the driver."""
    if finished is None:
        return manifest
    schema = manifest.schema(fetch_if_missing=True).base_schema
    left = manifest.join(finished.select_columns(["id"]), join_type="left_anti", on=("id",),
                         num_partitions=partitions(rows))
    # Materialised before the actors start: the join's reduce tasks take a whole CPU, which actors sized to
    # leave TASK_CPUS free would starve. The rows wait in the object store (spilled if large), not the driver.
    return left.map_batches(lambda t: t.cast(schema), batch_format="pyarrow", batch_size=None,  # joins widen strings
                            num_cpus=TASK_CPUS).materialize()


# ---------------------------------------------------------------------------------- compaction


def _best_sorted(table: pa.Table) -> pa.Table:
    return best_rows(table).sort_by("id")  # a partition's rows in one order, whatever order its blocks came in


def compact(out: str) -> str | None:
    """Rewrites OUT/results/results.parquet with one row per id (the final row winning, then the latest).

    The rows stream from a hash-partitioned Ray Data job into one Parquet file that appears whole (renamed
    locally, committed on close in a store), so a reader sees the old table or the new one. Log parts stay,
    so a killed compaction loses nothing, and running it again gives the same table. Parts an older
    version left directly in results/ are folded in, then removed.
    """
    uris, schema, rows = _footers(out)
    if not uris:
        return None
    if rows <= LOCAL_ROWS:  # the driver reads them all (what `read_results` does): no shuffle to start
        blocks: Iterable[pa.Table] = [read_results(out).sort_by("id")]  # one row per id already
    else:
        _quiet()
        ds, rows, schema = ranked_results(out)  # type: ignore[misc] - there are files
        blocks = ds.repartition(partitions(rows), keys=["id"]).map_batches(
            _best_sorted, batch_format="pyarrow", batch_size=None).iter_batches(batch_size=None, batch_format="pyarrow")
    uri = join(results_dir(out), COMPACTED)
    with atomic_output(uri) as sink, pq.ParquetWriter(sink, schema) as writer:
        for block in blocks:
            writer.write_table(conform(block, schema))
    for part in legacy_parts(out):  # their rows are in the compacted table now
        delete(part)
    return uri
