"""Dataset exports of a real render: Hugging Face Parquet shards and WebDataset tars, to local disk and to
the test S3 server, loaded back with `datasets` (offline) and `webdataset`."""

from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path

import pytest

from helpers import write_manifest
from jobs.cli import main
from jobs.export import run_export
from jobs.render import RenderJob, run
from storage.fs import list_files, read_bytes
from storage.results import absolute_uri, read_results

pytestmark = pytest.mark.timeout(900)  # a render, then Ray Data shuffles, on 2 busy cores


@pytest.fixture(scope="module")
def rendered(tmp_path_factory, tiny_catalog, ray_cluster):
    """A render with ok rows of two models, a failed row, a carried column and ids with dots."""
    root = tmp_path_factory.mktemp("export")
    rows = [{"id": f"item.{i:02d}", "prompt": f"{i}", "num_inference_steps": 2, "campaign": "spring",
             "model": "tiny-sd" if i % 3 else "tiny-sdxl"} for i in range(7)]
    rows.append({"id": "broken", "prompt": "x", "model": "no-such-model", "campaign": "spring"})
    manifest = write_manifest(str(root / "manifest.parquet"), rows)
    out = str(root / "out")
    report = run(RenderJob(manifest, out, catalog=tiny_catalog, workers=1, batch_size=4, address=ray_cluster))
    assert report.counts == {"ok": 7, "failed": 1}
    results = {r["id"]: r for r in read_results(out).to_pylist() if r["status"] == "ok"}
    files = {i: read_bytes(absolute_uri(out, r["output_uri"])) for i, r in results.items()}
    return out, results, files


def local_copy(dest: str, target: Path) -> Path:
    """The export's files on local disk (from a store, through our own reader)."""
    for uri in list_files(dest):
        path = target / uri[len(dest.rstrip("/")) + 1:]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(read_bytes(uri))
    return target


def check_hf(folder: Path, results: dict, files: dict, monkeypatch) -> None:
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import datasets

    shards = sorted((folder / "data").glob("*.parquet"))
    n = len(shards)
    assert [s.name for s in shards] == [f"train-{k:05d}-of-{n:05d}.parquet" for k in range(n)]
    ds = datasets.load_dataset("parquet", data_files=[str(s) for s in shards], split="train",
                               cache_dir=str(folder.parent / f"hf-cache-{folder.name}"))
    assert isinstance(ds.features["image"], datasets.Image)
    assert ds.features["prompt"] == datasets.Value("string") and ds.features["seed"] == datasets.Value("int64")
    assert ds.num_rows == len(results)
    assert ds[0]["image"].size == (64, 64)  # decodes to a PIL image
    raw = ds.cast_column("image", datasets.Image(decode=False))
    for row in raw:
        assert row["image"]["bytes"] == files[row["id"]]
        assert row["prompt"] == results[row["id"]]["prompt"] and row["campaign"] == "spring"
        assert row["model"] == results[row["id"]]["model"] and row["seed"] == results[row["id"]]["seed"]
    card = (folder / "README.md").read_text()
    assert "data/train-*.parquet" in card and "| tiny-sd | 4 | openrail-test |" in card and "| tiny-sdxl | 3 |" in card


def check_wds(folder: Path, results: dict, files: dict) -> None:
    import pyarrow.parquet as pq
    import webdataset as wds

    stats = json.loads((folder / "_stats.json").read_text())
    tars = sorted(folder.glob("shard-*.tar"))
    assert stats["rows"] == len(results) and stats["shards"] == len(tars)
    import hashlib

    for f in stats["files"]:
        assert hashlib.sha256((folder / f["name"]).read_bytes()).hexdigest() == f["sha256"]
    samples = list(wds.WebDataset([str(t) for t in tars], shardshuffle=False, empty_check=False))
    assert len(samples) == len(results)
    for s in samples:
        row = json.loads(s["json"])
        assert "." not in s["__key__"] and s["png"] == files[row["id"]]
        assert s["txt"].decode() == results[row["id"]]["prompt"] and row["status"] == "ok"
    meta = [pq.read_table(t.with_suffix(".parquet")) for t in tars]
    assert sum(m.num_rows for m in meta) == len(results)
    with tarfile.open(tars[0]) as tar:
        assert all(m.mtime == 0 for m in tar.getmembers())


def licensed_catalog(tiny_catalog: str, tmp_path: Path) -> str:
    """The tiny catalog with a licence on one model, written beside it so its relative sources still resolve."""
    import yaml

    data = yaml.safe_load(Path(tiny_catalog).read_text())
    data["models"]["tiny-sd"]["license"] = "openrail-test"
    path = Path(tiny_catalog).with_name("catalog-licensed.yaml")
    path.write_text(yaml.safe_dump(data))
    return str(path)


def test_export_to_local_disk_loads_and_reruns_idempotently(rendered, tiny_catalog, tmp_path, monkeypatch, capsys):
    out, results, files = rendered
    catalog = licensed_catalog(tiny_catalog, tmp_path)
    hf = tmp_path / "hf"
    assert main(["export", out, "--format", "hf", str(hf), "--shard-rows", "3", "--catalog", catalog]) == 0
    assert "exported 7 ok rows in " in capsys.readouterr().out
    check_hf(hf, results, files, monkeypatch)
    first = json.loads((hf / "_stats.json").read_text())
    assert main(["export", out, "--format", "hf", str(hf), "--shard-rows", "3", "--catalog", catalog]) == 0
    assert json.loads((hf / "_stats.json").read_text())["files"] == first["files"]  # same shards, byte for byte
    assert main(["export", out, "--format", "hf", str(hf), "--shard-rows", "100", "--catalog", catalog]) == 0
    assert [p.name for p in (hf / "data").iterdir()] == ["train-00000-of-00001.parquet"]  # stale shards gone
    check_hf(hf, results, files, monkeypatch)

    web = tmp_path / "wds"
    assert main(["export", out, "--format", "webdataset", str(web), "--shard-rows", "4"]) == 0
    check_wds(web, results, files)
    before = {p.name: p.read_bytes() for p in web.iterdir()}
    assert main(["export", out, "--format", "webdataset", str(web), "--shard-rows", "4"]) == 0
    assert {p.name: p.read_bytes() for p in web.iterdir()} == before


def test_export_to_s3(rendered, s3_server, tiny_catalog, tmp_path, monkeypatch):
    out, results, files = rendered
    bucket = s3_server.create_bucket("exports")
    catalog = licensed_catalog(tiny_catalog, tmp_path)
    stats = run_export(out, "hf", f"{bucket}/hf", shard_rows=2, catalog=catalog)
    assert stats["rows"] == 7 and 1 <= stats["shards"] <= 4  # 4 hash buckets; an empty one writes no shard
    check_hf(local_copy(f"{bucket}/hf", tmp_path / "hf"), results, files, monkeypatch)
    stats = run_export(out, "webdataset", f"{bucket}/wds", shard_rows=5)
    assert stats["rows"] == 7 and 1 <= stats["shards"] <= 2
    check_wds(local_copy(f"{bucket}/wds", tmp_path / "wds"), results, files)


def test_export_refuses_a_path_without_results(tmp_path, capsys):
    assert main(["export", str(tmp_path), "--format", "hf", str(tmp_path / "d")]) == 2
    assert "no results here" in capsys.readouterr().err


def test_features_match_what_datasets_infers():
    """Every plain column's feature is the one `datasets` itself would infer; media columns get media features."""
    import datasets
    import pyarrow as pa

    from cluster.export import _value_feature, hf_schema
    from storage.results import RESULT_SCHEMA

    schema = RESULT_SCHEMA.append(pa.field("campaign", pa.string())).append(pa.field("when", pa.timestamp("us", tz="UTC")))
    inferred = datasets.Features.from_arrow_schema(schema).to_dict()
    assert {f.name: _value_feature(f.type) for f in schema} == inferred
    features = datasets.Features.from_arrow_schema(hf_schema(schema, ["image", "video", "audio", "mesh", "edit"]))
    assert [type(features[c]).__name__ for c in ("image", "video", "audio", "mesh")] == ["Image", "Video", "Audio", "Mesh"]
    assert "worker" not in features and "output_uri" not in features and features["campaign"] == datasets.Value("string")
