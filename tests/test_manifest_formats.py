"""Manifests from where prompts live: CSV and JSON Lines files and folders, read at the manifest's own
column types (a prompt of digits stays a string), with the same schema checks as Parquet."""

from __future__ import annotations

import json

import pyarrow as pa
import pytest

from jobs.render import RenderJob, run
from storage.manifest import ManifestError, check_files, check_schema, manifest_files, open_manifest
from storage.results import read_results

pytestmark = pytest.mark.timeout(300)


def test_csv_keeps_digit_prompts_and_ids_as_text(tmp_path):
    path = tmp_path / "m.csv"
    path.write_text("id,prompt,seed,guidance_scale,campaign\n007,123,5,7,spring\n008,hello,,7.5,spring\n")
    ds = open_manifest(str(path))
    check_schema(ds.schema)
    check_files(ds)
    table = ds.to_table()
    assert table.schema.field("prompt").type == pa.string() and table.schema.field("seed").type == pa.int64()
    assert table.schema.field("guidance_scale").type == pa.float64()
    assert table.to_pylist()[0] == {"id": "007", "prompt": "123", "seed": 5, "guidance_scale": 7.0, "campaign": "spring"}
    assert table["seed"].to_pylist() == [5, None]


def test_jsonl_folder_and_null_columns(tmp_path):
    folder = tmp_path / "prompts"
    folder.mkdir()
    (folder / "a.jsonl").write_text(json.dumps({"id": "1", "prompt": "42", "seed": None}) + "\n")
    (folder / "b.jsonl").write_text(json.dumps({"id": "2", "prompt": "x", "seed": 9, "loras": [{"uri": "l", "scale": 0.5}]}) + "\n")
    (folder / "_notes.txt").write_text("hidden files are skipped")
    assert manifest_files(str(folder))[0] == "json"
    ds = open_manifest(str(folder))
    check_schema(ds.schema)
    check_files(ds)
    rows = sorted(ds.to_table().to_pylist(), key=lambda r: r["id"])
    assert rows[0]["prompt"] == "42" and rows[1]["seed"] == 9 and ds.schema.field("seed").type == pa.int64()


@pytest.mark.parametrize("name, text, problem", [
    ("bad.csv", "id,prompt,seed\n1,a,five\n", "seed"),  # not an integer: unreadable at the manifest's type
    ("bad.jsonl", json.dumps({"id": "1", "prompt": 5}) + "\n", "column 'prompt' must be string"),
    ("noid.csv", "prompt\nhello\n", "missing required column 'id'"),
])
def test_schema_checks_apply(tmp_path, name, text, problem):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(ManifestError, match=problem):
        ds = open_manifest(str(path))
        check_schema(ds.schema)
        check_files(ds)
        ds.to_table()


def test_mixed_folder_is_refused(tmp_path):
    (tmp_path / "a.csv").write_text("id,prompt\n1,a\n")
    (tmp_path / "b.jsonl").write_text('{"id": "2", "prompt": "b"}\n')
    with pytest.raises(ManifestError, match="mixes formats"):
        open_manifest(str(tmp_path))


def test_render_reads_csv_and_jsonl(tmp_path, tiny_catalog, ray_cluster):
    csv_path = tmp_path / "in" / "m.csv"
    csv_path.parent.mkdir()
    csv_path.write_text("id,prompt,num_inference_steps,campaign\n001,123,2,spring\n002,456,2,spring\n")
    out = str(tmp_path / "out")
    report = run(RenderJob(str(csv_path), out, catalog=tiny_catalog, workers=1, batch_size=2, address=ray_cluster))
    assert report.counts == {"ok": 2}
    results = {r["id"]: r for r in read_results(out).to_pylist()}
    assert results["001"]["prompt"] == "123" and results["001"]["campaign"] == "spring"
    jsonl = tmp_path / "in2"
    jsonl.mkdir()
    (jsonl / "part-1.jsonl").write_text(json.dumps({"id": "j1", "prompt": "789", "num_inference_steps": 2}) + "\n")
    again = run(RenderJob(str(jsonl), str(tmp_path / "out2"), catalog=tiny_catalog, workers=1, batch_size=2,
                          address=ray_cluster))
    assert again.counts == {"ok": 1}
    assert read_results(str(tmp_path / "out2")).to_pylist()[0]["prompt"] == "789"
