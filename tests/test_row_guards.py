"""Adversarial rows against the renderer in-process: where inputs may come from, values that do not fit
the results schema, and edge cases that used to fail with an internal error. Table-driven."""

from __future__ import annotations

import os
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from cluster.renderer import Renderer, RendererConfig
from storage.manifest import ManifestError, check_files, open_manifest
from storage.params import derive_seed
from storage.results import RESULT_SCHEMA

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """A manifest folder with an image, a symlink out of it, a FIFO, a pickle LoRA; and a separate input root."""
    root = tmp_path_factory.mktemp("guards")
    manifest, other = root / "manifest", root / "elsewhere"
    manifest.mkdir()
    other.mkdir()
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    image.save(manifest / "src.png")
    image.save(other / "outside.png")
    os.symlink("/etc/hostname", manifest / "link.png")
    os.symlink(other / "outside.png", manifest / "link-out.png")
    os.mkfifo(manifest / "fifo.png")
    (manifest / "lora.bin").write_bytes(b"\x80\x04pickle")
    (manifest / "a-folder.png").mkdir()
    return manifest, other


@pytest.fixture(scope="module")
def renderer(folders, tiny_catalog, tmp_path_factory):
    manifest, other = folders
    return Renderer(RendererConfig(catalog_path=tiny_catalog, out=str(tmp_path_factory.mktemp("out")), torch_threads=1,
                                   input_base=str(manifest)))


EDIT = {"task": "edit", "model": "tiny-sd-img2img", "prompt": "p", "num_inference_steps": 2}
# id, row, expected status, expected reason (None for ok)
CASES = [
    ("abs-etc", {**EDIT, "image_uri": "/etc/passwd"}, "failed", "input_not_allowed"),
    ("proc-environ", {**EDIT, "image_uri": "/proc/self/environ"}, "failed", "input_not_allowed"),
    ("climb", {**EDIT, "image_uri": "../elsewhere/outside.png"}, "failed", "input_not_allowed"),
    ("symlink-etc", {**EDIT, "image_uri": "link.png"}, "failed", "input_not_allowed"),
    ("symlink-out", {**EDIT, "image_uri": "link-out.png"}, "failed", "input_not_allowed"),
    ("mask-etc", {**EDIT, "model": "tiny-sd-inpaint", "image_uri": "src.png", "mask_uri": "/etc/passwd"}, "failed", "input_not_allowed"),
    ("control-etc", {"model": "tiny-sd-controlnet", "prompt": "p", "control_image_uris": ["/etc/passwd"]}, "failed", "input_not_allowed"),
    ("lora-etc", {"model": "tiny-sd", "prompt": "p", "loras": [{"uri": "/etc", "scale": 1.0}]}, "failed", "input_not_allowed"),
    ("embedding-etc", {"model": "tiny-sd", "prompt": "p", "embeddings": ["/etc/hostname"]}, "failed", "input_not_allowed"),
    ("lora-pickle", {"model": "tiny-sd", "prompt": "p", "loras": [{"uri": "lora.bin", "scale": 1.0}]}, "failed", "invalid_lora"),
    ("fifo", {**EDIT, "image_uri": "fifo.png"}, "failed", "invalid_input"),
    ("directory", {**EDIT, "image_uri": "a-folder.png"}, "failed", "invalid_input"),
    ("strength-zero", {**EDIT, "image_uri": "src.png", "strength": 0.0}, "failed", "invalid_strength"),
    ("strength-steps", {**EDIT, "image_uri": "src.png", "strength": 0.2, "num_inference_steps": 4}, "failed", "invalid_strength"),
    ("steps-float", {"prompt": "p", "num_inference_steps": 2.5}, "failed", "invalid_steps"),
    ("guidance-nan", {"prompt": "p", "guidance_scale": float("nan")}, "failed", "invalid_guidance"),
    ("width-huge", {"prompt": "p", "width": 2**31}, "failed", "invalid_size"),
    ("height-negative", {"prompt": "p", "height": -2**40}, "failed", "invalid_size"),
    ("inside", {**EDIT, "image_uri": "src.png"}, "ok", None),
]


@pytest.mark.parametrize("row_id, row, status, reason", CASES, ids=[c[0] for c in CASES])
def test_adversarial_rows_fail_alone_with_their_reason(renderer, row_id, row, status, reason):
    started = time.monotonic()
    [result] = renderer.render_rows([{"id": row_id, **row}])
    assert time.monotonic() - started < 120  # a FIFO must not hang the actor
    assert result["status"] == status, result.get("error")
    if reason:
        assert result["error"].split(":")[0] == reason, result["error"]
    assert "root:" not in (result.get("error") or "")  # nothing of /etc/passwd is echoed back


def test_an_input_root_widens_where_inputs_may_come_from(folders, tiny_catalog, tmp_path):
    manifest, other = folders
    wide = Renderer(RendererConfig(catalog_path=tiny_catalog, out=str(tmp_path / "out"), torch_threads=1,
                                   input_base=str(manifest), input_roots=(str(other),)))
    rows = [{"id": "abs", **EDIT, "image_uri": str(other / "outside.png")}, {"id": "link", **EDIT, "image_uri": "link-out.png"},
            {"id": "etc", **EDIT, "image_uri": "link.png"}]
    assert [r["status"] for r in wide.render_rows(rows)] == ["ok", "ok", "failed"]


def test_values_outside_the_results_schema_fail_their_row_only(renderer):
    """Out-of-range raw values used to break the results table (and the whole job, on every rerun)."""
    batch = pa.table({
        "id": ["w", "h", "s", "fine"],
        "prompt": ["p"] * 4,
        "width": pa.array([2**31, None, None, None], pa.int64()),
        "height": pa.array([None, -2**40, None, None], pa.int64()),
        "seed": pa.array([None, None, 2**64 - 1, 5], pa.uint64()),
        "num_inference_steps": pa.array([2, 2, 2, 2], pa.int64()),
    })
    table = renderer(batch)
    assert table.schema.field("seed").type == RESULT_SCHEMA.field("seed").type
    rows = {r["id"]: r for r in table.to_pylist()}
    assert rows["fine"]["status"] == "ok" and rows["fine"]["seed"] == 5
    assert [rows[i]["error"].split(":")[0] for i in "whs"] == ["invalid_size", "invalid_size", "invalid_seed"]
    assert rows["s"]["seed"] == derive_seed("s") and str(2**64 - 1) in rows["s"]["error"]
    assert rows["w"]["width"] is None and rows["h"]["height"] is None


def test_every_file_of_a_directory_manifest_is_checked(tmp_path):
    folder = tmp_path / "manifest"
    folder.mkdir()
    pq.write_table(pa.table({"id": ["a"], "prompt": ["x"], "width": pa.array([64], pa.int64())}), folder / "part-0.parquet")
    pq.write_table(pa.table({"id": ["b"], "prompt": pa.array([7], pa.int64())}), folder / "part-1.parquet")
    pq.write_table(pa.table({"id": ["c"], "prompt": ["y"], "width": pa.array([64.5])}), folder / "part-2.parquet")
    with pytest.raises(ManifestError) as e:
        check_files(open_manifest(str(folder)))
    message = str(e.value)
    assert "part-1.parquet: column 'prompt' must be string" in message
    assert "part-2.parquet: column 'width' must be integer" in message
    assert "column 'width' is int64 in" in message and "double" in message


def test_a_manifest_on_s3_reads_relative_inputs_from_s3_and_no_local_files(s3_server, tiny_catalog, tmp_path):
    import io

    from storage.fs import join, write_bytes

    folder = join(s3_server.create_bucket("guards-in"), "in")
    png = io.BytesIO()
    Image.new("RGB", (64, 64), "gray").save(png, format="PNG")
    write_bytes(join(folder, "src.png"), png.getvalue())
    remote = Renderer(RendererConfig(catalog_path=tiny_catalog, out=str(tmp_path / "out"), torch_threads=1, input_base=folder))
    rows = [{"id": "rel", **EDIT, "image_uri": "src.png"}, {"id": "abs", **EDIT, "image_uri": join(folder, "src.png")},
            {"id": "local", **EDIT, "image_uri": "/etc/passwd"}]
    results = remote.render_rows(rows)
    assert [r["status"] for r in results] == ["ok", "ok", "failed"]
    assert results[2]["error"].startswith("input_not_allowed")
