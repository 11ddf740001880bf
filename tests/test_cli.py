"""The command line: exit codes, messages, the status report, and the first-use commands."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from helpers import write_manifest
from jobs.cli import DefaultsFormatter, main, parser
from jobs.exits import EXIT_RESULTS_UNAVAILABLE, EXIT_ROWS_FAILED, RESULTS_DEADLINE_S
from storage.results import DEFAULT_DEADLINE_S, RESULT_SCHEMA, JobStopped, ResultsWriter

pytestmark = pytest.mark.timeout(120)


def write_results(out, records) -> None:
    w = ResultsWriter(str(out), flush_rows=10_000)
    w.add(pa.Table.from_pylist(records, schema=RESULT_SCHEMA))
    w.flush()


FIVE = [
    {"id": "a", "status": "ok"}, {"id": "b", "status": "failed", "error": "unknown_model: x"},
    {"id": "c", "status": "failed", "error": "unknown_model: y"}, {"id": "d", "status": "failed", "error": "invalid_size: z"},
    {"id": "e", "status": "filtered"},
]


def test_status_counts_reasons_and_failed_ids(tmp_path, capsys):
    write_results(tmp_path, FIVE)
    assert main(["status", str(tmp_path)]) == 0
    text = capsys.readouterr().out
    assert "rows: 5  ok=1  failed=3  filtered=1" in text
    assert "failed unknown_model: 2" in text and "failed invalid_size: 1" in text
    assert "manifest: size unknown" in text
    assert text.splitlines()[-3:] == ["  b", "  c", "  d"]


def test_status_lists_20_failed_ids_unless_all(tmp_path, capsys):
    write_results(tmp_path, [{"id": f"r{i:02d}", "status": "failed", "error": "render_error: x"} for i in range(25)])
    assert main(["status", str(tmp_path)]) == 0
    text = capsys.readouterr().out
    assert "failed ids (first 20 of 25; --all shows all):" in text and "  r19" in text and "r20" not in text
    assert main(["status", str(tmp_path), "--all"]) == 0
    assert "  r24" in capsys.readouterr().out


def test_status_json_has_totals_counts_reasons_and_ids(tmp_path, capsys):
    write_results(tmp_path, FIVE)
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "20260101T000000Z-aaaaaa.json").write_text(json.dumps({"manifest_total": 4}))
    (tmp_path / "runs" / "20260102T000000Z-bbbbbb.json").write_text(json.dumps({"manifest_total": 8}))
    assert main(["status", str(tmp_path), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["manifest_total"] == 8 and doc["results"] == 5 and doc["pending"] == 3
    assert doc["counts"] == {"ok": 1, "failed": 3, "filtered": 1}
    assert doc["reasons"] == {"unknown_model": 2, "invalid_size": 1}
    assert doc["failed_ids"] == ["b", "c", "d"]


@pytest.mark.parametrize("command", ["status", "report"])
def test_status_and_report_refuse_a_path_without_results(tmp_path, capsys, command):
    missing = tmp_path / "typo"
    assert main([command, str(missing)]) == 2
    assert f"error: {missing}: no such folder" in capsys.readouterr().err
    assert not missing.exists()  # report must not create it
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main([command, str(empty)]) == 2
    assert "no results here" in capsys.readouterr().err
    assert list(empty.iterdir()) == []


def test_render_exits_3_when_rows_fail_unless_tolerated(tmp_path, capsys, tiny_catalog, ray_cluster):
    rows = [{"id": f"ok-{i}", "prompt": "a small scene", "num_inference_steps": 2} for i in range(3)]
    rows.append({"id": "bad", "prompt": "x", "model": "no-such-model"})
    m = write_manifest(str(tmp_path / "m.parquet"), rows)
    out = str(tmp_path / "out")
    common = ["render", m, "--out", out, "--catalog", tiny_catalog, "--address", ray_cluster, "--workers", "1"]
    assert main(common) == EXIT_ROWS_FAILED
    assert "exit status 3: 1 of 4 rows failed (25.0%)" in capsys.readouterr().out
    # The rerun retries only the bad row; one failure in four is within 0.25.
    assert main(common + ["--max-failed-fraction", "0.25"]) == 0
    assert "within --max-failed-fraction 0.25" in capsys.readouterr().out
    assert main(["status", out, "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["manifest_total"] == 4 and doc["pending"] == 0 and doc["failed_ids"] == ["bad"]


def test_max_failed_fraction_must_be_a_fraction(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["render", "m.parquet", "--out", str(tmp_path), "--max-failed-fraction", "1.5"])
    assert e.value.code == 2 and "outside 0..1" in capsys.readouterr().err


def test_job_report_exit_status_follows_the_failed_fraction():
    from jobs.render import JobReport

    report = JobReport(total=10, skipped=4, counts={"ok": 5, "failed": 1}, failures={"render_error": 1},
                       elapsed_s=1.0, out="o", results="o/results")
    assert report.exit_status() == EXIT_ROWS_FAILED and report.exit_status(0.05) == EXIT_ROWS_FAILED
    assert report.exit_status(0.1) == 0 and "within --max-failed-fraction 0.1" in report.verdict(0.1)
    clean = JobReport(total=3, skipped=3, counts={}, failures={}, elapsed_s=0.0, out="o", results="o/results")
    assert clean.exit_status() == 0 and clean.verdict() == "exit status 0: every row is final"


def test_exit_codes_are_distinct_and_match_the_job():
    assert EXIT_RESULTS_UNAVAILABLE == JobStopped.exit_code and RESULTS_DEADLINE_S == DEFAULT_DEADLINE_S
    assert EXIT_ROWS_FAILED not in (0, 1, 2, 75, 130)


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


def test_version_is_quick_and_needs_no_heavy_imports():
    code = "import sys; from jobs.cli import main\ntry:\n main(['--version'])\nexcept SystemExit: pass\n" \
           "print(sorted(m for m in ('torch', 'ray', 'diffusers', 'pyarrow.dataset') if m in sys.modules))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    assert done.stdout.startswith("renderfleet ") and done.stdout.strip().endswith("[]")


def _subparsers(p: argparse.ArgumentParser):
    yield p
    for action in p._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                yield from _subparsers(child)


def test_every_option_shows_its_default():
    missing = []
    for p in _subparsers(parser()):
        assert p.formatter_class is DefaultsFormatter, p.prog
        fmt = p._get_formatter()
        for a in p._actions:
            if a.option_strings and not isinstance(a, (argparse._HelpAction, argparse._VersionAction)):
                if "default" not in fmt._get_help_string(a) and not a.required:
                    missing.append(f"{p.prog} {a.option_strings[0]}")
    assert not missing


def test_env_reports_versions_devices_and_catalog(tmp_path, capsys):
    assert main(["env", "--json", "--catalog", str(tmp_path / "c.yaml")]) == 0
    info = json.loads(capsys.readouterr().out)
    for key in ("python", "torch", "diffusers", "transformers", "ray", "pyarrow", "cuda_available", "renderfleet"):
        assert key in info
    assert info["catalog"] == str(tmp_path / "c.yaml") and info["catalog_exists"] is False


def test_init_writes_a_runnable_starter_project(tmp_path, capsys, tiny_catalog):
    """Each example's model serves its task in the tiny catalog (all five rendered ok when this was written)."""
    from pipelines.catalog import Catalog
    from storage.manifest import check_schema

    tiny = Catalog.load(tiny_catalog)
    d = tmp_path / "proj"
    assert main(["init", str(d)]) == 0
    for task in ("image", "edit", "video", "mesh", "audio"):
        table = pq.read_table(d / f"{task}.parquet")
        check_schema(table.schema)
        assert set(table["task"].to_pylist()) == {task}
        assert all(task in tiny.get(m).tasks for m in table["model"].to_pylist())
    assert (d / "inputs" / "photo.png").is_file()
    assert "renderfleet render image.parquet" in (d / "README.txt").read_text()
    catalog = Catalog.load(d / "catalog.yaml")
    assert catalog.default_model == "tiny-sd" and "replace each `source`" in (d / "catalog.yaml").read_text()
    capsys.readouterr()
    assert main(["init", str(d)]) == 2  # never overwrites silently
    assert "already exist" in capsys.readouterr().err
    assert main(["init", str(d), "--force"]) == 0


def test_models_list_shows_name_kind_tasks_source(tiny_catalog, capsys):
    assert main(["models", "list", "--catalog", tiny_catalog]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["NAME", "KIND", "TASKS", "SOURCE"]
    sd = next(line.split() for line in lines if line.startswith("tiny-sd "))
    assert sd[1:4] == ["*", "pipeline", "image"] and sd[4] == os.path.join(os.path.dirname(tiny_catalog), "tiny-sd")


def test_build_tiny_unknown_name_is_a_clear_error(tmp_path, capsys):
    assert main(["models", "build-tiny", str(tmp_path), "no-such-name"]) == 2
    err = capsys.readouterr().err
    assert "unknown tiny model 'no-such-name'; known: tiny-sd" in err and "Traceback" not in err
