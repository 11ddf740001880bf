"""Cluster-wide bookkeeping: id checks, the resume anti-join and compaction, hash-partitioned over
several partitions, agree with the one-table readers."""

from __future__ import annotations

import os

import pandas as pd
import pyarrow as pa
import pyarrow.dataset  # noqa: F401 - pa.dataset
import pyarrow.parquet as pq
import pytest
import ray

import cluster.ledger as ledger
from storage.manifest import ManifestError, check_ids
from storage.results import COMPACTED, RESULT_SCHEMA, ResultsWriter, read_results, results_dir

pytestmark = pytest.mark.timeout(240)


@pytest.fixture
def small_partitions(monkeypatch):
    """A few rows per partition, so every operation really spreads over several partitions (and no job is
    small enough for the driver to do it alone)."""
    monkeypatch.setattr(ledger, "ROWS_PER_PARTITION", 3)
    monkeypatch.setattr(ledger, "LOCAL_ROWS", 0)


def _results(*items, extra: dict | None = None) -> pa.Table:
    rows = [{"id": i, "status": s, "seed": n, **(extra or {})} for i, s, n in items]
    schema = RESULT_SCHEMA if not extra else RESULT_SCHEMA.append(pa.field(next(iter(extra)), pa.string()))
    return pa.Table.from_pylist(rows, schema=schema)


def _write(out: str, run_id: str, table: pa.Table) -> None:
    w = ResultsWriter(out, run_id=run_id, flush_rows=10**6)
    w.add(table)
    w.flush()


def test_duplicates_nulls_and_finished_counts_agree_with_one_table(ray_cluster, tmp_path, small_partitions):
    ids = ["a", "b", "a", "c", "b", "a", "d", "e", "f", "g", "h"]
    manifest = ray.data.from_arrow(pa.table({"id": ids, "prompt": ["p"] * len(ids)}))
    report = ledger.check_ids(manifest, None, len(ids))
    with pytest.raises(ManifestError) as single:
        check_ids(pa.array(ids))
    assert report.problem() == str(single.value) == "manifest has 2 duplicate ids: 'a' (x3), 'b' (x2)"
    nulls = ray.data.from_arrow(pa.table({"id": pa.array(["a", None, "b", None], pa.string())}))
    assert ledger.check_ids(nulls, None, 4).problem() == "manifest has 2 rows with a null 'id'"

    out = str(tmp_path)
    _write(out, "20260101T000000Z-aaaaaa", _results(("d", "ok", 1), ("e", "failed", 2), ("f", "filtered", 3),
                                                     ("zz", "ok", 4), ("d", "failed", 1)))
    clean = ray.data.from_arrow(pa.table({"id": list("defghij"), "prompt": ["p"] * 7}))
    report = ledger.check_ids(clean, ledger.finished_ids(out), 7)
    assert report.problem() is None and report.finished == 2  # d (ok, then a failure) and f; not zz (not ours)


def test_resume_anti_join_keeps_every_column(ray_cluster, tmp_path, small_partitions):
    out = str(tmp_path)
    _write(out, "20260101T000000Z-aaaaaa", _results(("r1", "ok", 1), ("r3", "failed", 3), ("r5", "filtered", 5)))
    manifest = pa.table({"id": [f"r{i}" for i in range(8)], "prompt": [f"p{i}" for i in range(8)],
                         "seed": pa.array(range(8), pa.int64()), "loras": [[f"l{i}"] for i in range(8)]})
    left = ledger.unfinished(ray.data.from_arrow(manifest), ledger.finished_ids(out), 8)
    left = pa.concat_tables(ray.get(left.to_arrow_refs()))
    left = left.sort_by("id")
    assert left["id"].to_pylist() == ["r0", "r2", "r3", "r4", "r6", "r7"]
    assert left.select(manifest.column_names).equals(
        manifest.filter(pa.compute.is_in(manifest["id"], value_set=left["id"].combine_chunks())).sort_by("id"))


def test_compaction_over_partitions_equals_the_one_table_read(ray_cluster, tmp_path, small_partitions):
    out = str(tmp_path)
    older = _results(*[(f"i{k}", "failed", k) for k in range(12)])  # written before a column existed
    _write(out, "20260101T000000Z-aaaaaa", older.drop_columns(["prompt"]))
    _write(out, "20260102T000000Z-bbbbbb", _results(*[(f"i{k}", "ok", k) for k in range(0, 12, 2)],
                                                     extra={"campaign": "spring"}))
    _write(out, "20260103T000000Z-cccccc", _results(("i0", "failed", 0), ("i1", "ok", 1), ("new", "ok", 9)))
    expected = read_results(out).sort_by("id")
    uri = ledger.compact(out)
    assert uri == os.path.join(results_dir(out), COMPACTED)
    table = pq.read_table(uri).sort_by("id")
    assert table.num_rows == 13 and table["id"].to_pylist() == expected["id"].to_pylist()
    assert table.select(["id", "status", "seed"]).equals(expected.select(["id", "status", "seed"]))
    assert dict(zip(table["id"].to_pylist(), table["campaign"].to_pylist()))["i2"] == "spring"
    assert pq.read_table(ledger.compact(out)).sort_by("id").equals(table)  # idempotent
    frame = pd.read_parquet(results_dir(out))  # a plain reader sees one row per id, seeds as int64
    assert frame["id"].is_unique and len(frame) == 13 and frame["seed"].dtype == "int64"


def test_every_reader_sees_one_row_per_id(ray_cluster, tmp_path):
    """pandas/Arrow dataset discovery skip `_log`, a duckdb glob does not descend into it, `datasets` agrees."""
    import datasets
    import duckdb

    out = str(tmp_path)
    _write(out, "20260101T000000Z-aaaaaa", _results(("a", "failed", 1), ("b", "ok", 2)))
    _write(out, "20260102T000000Z-bbbbbb", _results(("a", "ok", 1), ("b", "ok", 2)))
    ledger.compact(out)
    assert len(pd.read_parquet(results_dir(out))) == 2
    assert pa.dataset.dataset(results_dir(out), format="parquet").count_rows() == 2
    glob = os.path.join(results_dir(out), "*.parquet")
    assert duckdb.connect().execute(f"select count(*), count(distinct id) from '{glob}'").fetchall() == [(2, 2)]
    loaded = datasets.load_dataset("parquet", data_files=glob, split="train", cache_dir=str(tmp_path / "hf"))
    assert sorted(zip(loaded["id"], loaded["status"])) == [("a", "ok"), ("b", "ok")]


def test_a_failed_compaction_leaves_the_old_table(ray_cluster, tmp_path, monkeypatch, small_partitions):
    out = str(tmp_path)
    _write(out, "20260101T000000Z-aaaaaa", _results(("a", "ok", 1)))
    first = pq.read_table(ledger.compact(out))
    _write(out, "20260102T000000Z-bbbbbb", _results(("b", "ok", 2)))

    def broken(table):
        raise RuntimeError("killed mid-compaction")

    monkeypatch.setattr(ledger, "_best_sorted", broken)
    with pytest.raises(Exception, match="killed mid-compaction"):
        ledger.compact(out)
    assert pq.read_table(os.path.join(results_dir(out), COMPACTED)).equals(first)
    assert sorted(os.listdir(results_dir(out))) == ["_log", COMPACTED]  # no temporary left behind
    assert sorted(read_results(out)["id"].to_pylist()) == ["a", "b"]  # the log still has every row


def test_small_jobs_keep_the_books_in_the_driver_with_the_same_answers(ray_cluster, tmp_path, monkeypatch):
    """Up to LOCAL_ROWS, ids are checked, finished rows dropped and results compacted without a shuffle:
    the answers equal the distributed ones on the same files."""
    out = str(tmp_path / "out")
    _write(out, "20260101T000000Z-aaaaaa", _results(("d", "ok", 1), ("e", "failed", 2), ("f", "filtered", 3),
                                                     ("zz", "ok", 4), ("d", "failed", 1)))
    _write(out, "20260102T000000Z-bbbbbb", _results(("e", "ok", 2), ("g", "failed", 5)))
    path = str(tmp_path / "m.parquet")
    pq.write_table(pa.table({"id": list("defghijd"), "prompt": ["p"] * 8}), path)
    report, finished = ledger.local_ids(pa.dataset.dataset(path), out)
    assert report.problem() == "manifest has 1 duplicate ids: 'd' (x2)" and report.finished == 3  # d, e, f
    distributed = ledger.check_ids(ray.data.read_parquet(path), ledger.finished_ids(out), 8)
    assert report == distributed
    assert sorted(finished.to_pylist()) == ["d", "e", "f", "zz"]
    left = ledger.without(ray.data.read_parquet(path), finished).take_all()
    assert sorted(r["id"] for r in left) == ["g", "h", "i", "j"]

    local = pq.read_table(ledger.compact(out))  # 7 rows recorded: in the driver
    monkeypatch.setattr(ledger, "LOCAL_ROWS", 0)
    assert pq.read_table(ledger.compact(out)).equals(local)  # through the shuffle: the same file
    assert local["id"].to_pylist() == ["d", "e", "f", "g", "zz"] and local["status"].to_pylist()[:2] == ["ok", "ok"]
