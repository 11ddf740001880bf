"""The Python API: rendering as one step of a user's own Ray Data pipeline."""

from __future__ import annotations

import hashlib
import os

import pyarrow as pa
import pytest

from cluster.batch import render
from storage.results import absolute_uri

pytestmark = pytest.mark.timeout(300)


def test_render_is_a_step_in_a_ray_data_pipeline(ray_cluster, tiny_catalog, tmp_path):
    import ray

    rows = [{"id": f"api-{i}", "prompt": f"a scene {i}", "num_inference_steps": 1} for i in range(6)]
    rows.append({"id": "api-bad", "prompt": "x", "num_inference_steps": 0})
    ds = ray.data.from_items(rows)
    ds = ds.map_batches(lambda b: b.append_column("campaign", pa.array(["spring"] * b.num_rows)), batch_format="pyarrow")
    out = str(tmp_path / "out")
    results = render(ds, tiny_catalog, out, workers=1, batch_size=4)
    results = results.filter(lambda r: r["status"] == "ok" or r["error"].startswith("invalid_steps"))
    results.write_parquet(str(tmp_path / "results"))
    table = ray.data.read_parquet(str(tmp_path / "results")).to_arrow_refs()
    table = pa.concat_tables(ray.get(table))
    by_id = {r["id"]: r for r in table.to_pylist()}
    assert sorted(by_id) == sorted(r["id"] for r in rows)
    assert by_id["api-bad"]["status"] == "failed"
    for i in range(6):
        r = by_id[f"api-{i}"]
        assert r["status"] == "ok" and r["campaign"] == "spring"
        path = absolute_uri(out, r["output_uri"])
        assert not os.path.isabs(r["output_uri"]) and path.startswith(out) and os.path.isfile(path)
        with open(path, "rb") as f:
            assert hashlib.sha256(f.read()).hexdigest() == r["sha256"]
