"""The command line: exit codes, messages and the status report."""

from __future__ import annotations

import pyarrow as pa
import pytest

from helpers import write_manifest
from jobs.cli import main
from storage.results import RESULT_SCHEMA, ResultsWriter

pytestmark = pytest.mark.timeout(120)


def test_status_counts_and_reasons(tmp_path, capsys):
    w = ResultsWriter(str(tmp_path), flush_rows=100)
    w.add(pa.Table.from_pylist([
        {"id": "a", "status": "ok"}, {"id": "b", "status": "failed", "error": "unknown_model: x"},
        {"id": "c", "status": "failed", "error": "unknown_model: y"}, {"id": "d", "status": "failed", "error": "invalid_size: z"},
        {"id": "e", "status": "filtered"},
    ], schema=RESULT_SCHEMA))
    w.flush()
    assert main(["status", str(tmp_path)]) == 0
    text = capsys.readouterr().out
    assert "rows: 5  ok=1  failed=3  filtered=1" in text
    assert "failed unknown_model: 2" in text and "failed invalid_size: 1" in text


def test_manifest_errors_exit_2_with_the_reason(tmp_path, capsys, tiny_catalog):
    m = write_manifest(str(tmp_path / "m.parquet"), [{"id": "x", "prompt": "p"}, {"id": "x", "prompt": "p"}])
    assert main(["render", m, "--out", str(tmp_path / "out"), "--catalog", tiny_catalog]) == 2
    assert "error: manifest has 1 duplicate ids: 'x' (x2)" in capsys.readouterr().err


def test_catalog_errors_exit_2(tmp_path, capsys):
    bad = tmp_path / "c.yaml"
    bad.write_text("models: {a: {source: ., colour: red}}\n")
    m = write_manifest(str(tmp_path / "m.parquet"), [{"id": "x", "prompt": "p"}])
    assert main(["render", m, "--out", str(tmp_path / "out"), "--catalog", str(bad)]) == 2
    assert "unknown keys colour" in capsys.readouterr().err
