"""Results rows any reader can use: resolved call parameters, typed; seeds always set and exact in pandas."""

from __future__ import annotations

import pandas as pd
import pyarrow as pa
import pytest

from cluster.renderer import Renderer, RendererConfig
from storage.params import derive_seed
from storage.result_params import PARAM_FIELDS, fitted
from storage.results import RESULT_SCHEMA, ResultsWriter, read_results

pytestmark = pytest.mark.timeout(300)

BIG_SEED = 6808436691104822315


def test_fitted_never_breaks_the_schema():
    assert fitted(True, pa.int64()) is None and fitted(1.5, pa.int64()) is None and fitted(2**70, pa.int64()) is None
    assert fitted(3, pa.float64()) == 3.0 and fitted("x", pa.float64()) is None and fitted(5, pa.string()) is None
    assert fitted(0.5, pa.list_(pa.float64())) == [0.5] and fitted([1, "x"], pa.list_(pa.float64())) is None
    loras = RESULT_SCHEMA.field("loras").type
    assert fitted((("a.safetensors", 0.7),), loras) == [{"uri": "a.safetensors", "scale": 0.7}]
    assert fitted([{"uri": "b", "scale": "high"}, {"scale": 1}], loras) == [{"uri": "b", "scale": None}]
    assert {f.name for f in PARAM_FIELDS} >= {"prompt", "negative_prompt", "num_inference_steps", "guidance_scale",
                                              "strength", "num_frames", "fps", "audio_length_in_s", "loras",
                                              "embeddings", "output_format"}


def test_rows_carry_resolved_parameters_and_exact_seeds(tmp_path, tiny_catalog, ray_cluster):
    out = str(tmp_path / "out")
    renderer = Renderer(RendererConfig(catalog_path=tiny_catalog, out=out, torch_threads=1))
    manifest = pa.Table.from_pylist([
        {"id": "ok", "prompt": "a red cube", "negative_prompt": "blur", "num_inference_steps": 2, "guidance_scale": 3.0,
         "seed": BIG_SEED, "model": None, "campaign": "spring"},
        {"id": "default-seed", "prompt": "a blue cube", "num_inference_steps": 2, "campaign": "spring"},
        {"id": "bad-steps", "prompt": "x", "num_inference_steps": 0, "guidance_scale": 2.5, "campaign": "x"},
        {"id": "bad-model", "prompt": "x", "model": "no-such-model", "num_inference_steps": 2, "campaign": "x"},
        {"id": "bad-seed", "prompt": "x", "seed": -5, "num_inference_steps": 2, "campaign": "x"},
    ])
    table = renderer(manifest)
    assert table.schema.field("num_inference_steps").type == pa.int64()
    writer = ResultsWriter(out, flush_rows=1)
    writer.add(table)
    writer.flush()
    rows = {r["id"]: r for r in read_results(out).to_pylist()}
    ok = rows["ok"]
    assert ok["status"] == "ok" and ok["campaign"] == "spring"
    assert (ok["prompt"], ok["negative_prompt"], ok["num_inference_steps"], ok["guidance_scale"]) == ("a red cube", "blur", 2, 3.0)
    assert ok["output_format"] == "png" and (ok["width"], ok["height"]) == (64, 64) and ok["loras"] == []
    d = rows["default-seed"]
    assert d["guidance_scale"] is not None and d["num_inference_steps"] == 2  # catalog defaults, resolved
    assert rows["bad-steps"]["status"] == "failed" and rows["bad-steps"]["guidance_scale"] == 2.5
    assert rows["bad-steps"]["num_inference_steps"] == 0  # the raw value that fits; its error says why
    assert rows["bad-model"]["status"] == "failed" and rows["bad-model"]["prompt"] == "x"
    assert rows["bad-seed"]["status"] == "failed" and rows["bad-seed"]["seed"] == derive_seed("bad-seed")

    from cluster.ledger import compact
    from storage.results import results_dir

    compact(out)
    frame = pd.read_parquet(results_dir(out))
    assert len(frame) == 5 and frame["seed"].dtype == "int64" and not frame["seed"].isna().any()
    seeds = dict(zip(frame["id"], frame["seed"]))
    assert int(seeds["ok"]) == BIG_SEED
    assert all(int(seeds[i]) == derive_seed(i) for i in ("default-seed", "bad-steps", "bad-model", "bad-seed"))


def _rows(*items):
    return pa.Table.from_pylist([{"id": i, "status": s, "seed": seed, "output_uri": f"image/00/{i}.png"}
                                 for i, s, seed in items], schema=RESULT_SCHEMA)


def test_compaction_one_row_per_id_for_any_reader(tmp_path, ray_cluster):
    import os

    from cluster.ledger import compact
    from storage.fs import list_files, write_bytes
    from storage.results import COMPACTED, log_dir, remove_stray_parts, results_dir

    out = str(tmp_path)
    # A part an older version left directly in results/, then two runs appending to the log.
    legacy = ResultsWriter(out, run_id="20250101T000000Z-000000", flush_rows=1)
    legacy.add(_rows(("z", "ok", 7)))
    legacy.flush()
    for u in list_files(log_dir(out), suffix=".parquet"):
        os.replace(u, os.path.join(results_dir(out), os.path.basename(u)))
    first = ResultsWriter(out, run_id="20260101T000000Z-aaaaaa", flush_rows=100)
    first.add(_rows(("a", "failed", BIG_SEED), ("b", "ok", 1), ("c", "failed", 2)))
    first.flush()
    assert compact(out) == os.path.join(results_dir(out), COMPACTED)
    second = ResultsWriter(out, run_id="20260101T000100Z-bbbbbb", flush_rows=1)
    second.add(_rows(("a", "ok", BIG_SEED)))
    second.add(_rows(("b", "failed", 1)))  # a final row beats a later failure
    expected = {"a": "ok", "b": "ok", "c": "failed", "z": "ok"}
    assert dict(zip(*read_results(out).select(["id", "status"]).to_pydict().values())) == expected  # log + table
    before = compact(out)
    table = pa.parquet.read_table(before)
    assert compact(out) == before and pa.parquet.read_table(before).equals(table)  # idempotent
    names = sorted(os.path.relpath(u, results_dir(out)) for u in list_files(results_dir(out)))
    assert COMPACTED in names and len(names) == 4  # the legacy part was folded in and removed
    assert all(n.startswith("_log/part-") for n in names if n != COMPACTED)
    # A compaction killed mid-write leaves a hidden temporary: readers skip it, the next run removes it.
    stray = os.path.join(results_dir(out), f".{COMPACTED}.{'0' * 32}.tmp")
    write_bytes(stray, b"half a table")
    os.utime(stray, (1, 1))
    frame = pd.read_parquet(results_dir(out))  # pandas: the compacted table only, _log and .tmp skipped
    assert frame["id"].is_unique and dict(zip(frame["id"], frame["status"])) == expected
    assert frame["seed"].dtype == "int64" and int(frame.set_index("id").loc["a", "seed"]) == BIG_SEED
    assert remove_stray_parts(out, started=100.0) == [stray]
    assert dict(zip(*read_results(out).select(["id", "status"]).to_pydict().values())) == expected
