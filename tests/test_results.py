"""The results dataset: whole parts, deduplication on read, status summary."""

from __future__ import annotations

import pyarrow as pa
import pytest

from storage.results import RESULT_SCHEMA, ResultsWriter, has_results, read_results, summarize

pytestmark = pytest.mark.timeout(60)


def finished_ids(out: str) -> list[str]:
    table = read_results(out)
    return sorted(i for i, s in zip(table["id"].to_pylist(), table["status"].to_pylist()) if s in ("ok", "filtered"))


def rows(*items):
    return pa.Table.from_pylist([{"id": i, "status": s, "error": e} for i, s, e in items], schema=RESULT_SCHEMA)


def test_latest_final_row_wins(tmp_path):
    out = str(tmp_path)
    first = ResultsWriter(out, run_id="20260101T000000Z-aaaaaa", flush_rows=100)
    first.add(rows(("a", "failed", "render_error: boom"), ("b", "ok", None), ("c", "failed", "unknown_model: x")))
    first.flush()
    second = ResultsWriter(out, run_id="20260101T000100Z-bbbbbb", flush_rows=1)
    second.add(rows(("a", "ok", None)))
    second.add(rows(("b", "ok", None)))  # a repeat left by a kill between output and results
    second.add(rows(("c", "failed", "unknown_model: x")))
    table = read_results(out)
    assert sorted(table["id"].to_pylist()) == ["a", "b", "c"]
    status = dict(zip(table["id"].to_pylist(), table["status"].to_pylist()))
    assert status == {"a": "ok", "b": "ok", "c": "failed"}
    assert finished_ids(out) == ["a", "b"]
    s = summarize(out)
    assert s.total == 3 and s.by_status == {"ok": 2, "failed": 1} and s.failures == {"unknown_model": 1}


def test_final_row_beats_later_failure(tmp_path):
    w = ResultsWriter(str(tmp_path), flush_rows=1)
    w.add(rows(("a", "filtered", None)))
    w.add(rows(("a", "failed", "render_error: late")))
    assert read_results(str(tmp_path))["status"].to_pylist() == ["filtered"]


def test_empty_out_has_no_results(tmp_path):
    assert read_results(str(tmp_path / "nothing")).num_rows == 0
    assert len(finished_ids(str(tmp_path / "nothing"))) == 0


def test_user_columns_named_like_sort_keys_are_kept(tmp_path):
    """Carried manifest columns keep their names, whatever they are called."""
    w = ResultsWriter(str(tmp_path), flush_rows=1)
    for i, status in (("a", "failed"), ("b", "ok"), ("a", "ok")):
        t = rows((i, status, None))
        w.add(t.append_column("_order", pa.array(["x"])).append_column("_final", pa.array([7])).append_column("order", pa.array([1.5])))
    table = read_results(str(tmp_path))
    assert table["id"].to_pylist() == ["b", "a"] and table["status"].to_pylist() == ["ok", "ok"]
    assert table["_order"].to_pylist() == ["x", "x"] and table["_final"].to_pylist() == [7, 7]
    assert finished_ids(str(tmp_path)) == ["a", "b"]


def test_summary_has_failed_ids_and_the_latest_runs_manifest_total(tmp_path):
    out = str(tmp_path)
    assert not has_results(out) and not has_results(str(tmp_path / "nothing"))
    w = ResultsWriter(out, flush_rows=100)
    w.add(rows(("b", "failed", "render_error: x"), ("a", "failed", "unknown_model: y"), ("c", "ok", None)))
    w.flush()
    assert has_results(out)
    s = summarize(out)
    assert s.failed_ids == ("a", "b") and s.manifest_total is None and s.pending is None
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "20260101T000000Z-aaaaaa.json").write_text('{"manifest_total": 10}')
    (tmp_path / "runs" / "20260102T000000Z-bbbbbb.json").write_text("not json")  # a torn write is skipped
    s = summarize(out)
    assert s.manifest_total == 10 and s.pending == 7
    assert s.as_dict()["counts"] == {"ok": 1, "failed": 2, "filtered": 0}
