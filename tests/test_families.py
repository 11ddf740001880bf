"""Every task family end to end through the real job, outputs checked by readers we did not write."""

from __future__ import annotations

import io
import wave

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import trimesh
from PIL import Image

from helpers import probe_video
from jobs.render import RenderJob, run
from storage.fs import join, write_bytes
from storage.params import Limits
from storage.results import absolute_uri, read_results

pytestmark = pytest.mark.timeout(900)

P = "a red product shot"
LORA_A = [{"uri": "tiny-lora-sd", "scale": 0.8}]
LORA_B = [{"uri": "tiny-lora-sd-2", "scale": 1.0}]
LORA_AB = [{"uri": "tiny-lora-sd", "scale": 0.5}, {"uri": "tiny-lora-sd-2", "scale": 0.5}]

# id, row fields, check
ROWS = [
    ("sd", {"model": "tiny-sd", "prompt": P}, ("image", 64, 64)),
    ("sdxl", {"model": "tiny-sdxl", "prompt": P, "output_format": "webp"}, ("image", 64, 64)),
    ("sdxl-refined", {"model": "tiny-sdxl-refined", "prompt": P}, ("image", 64, 64)),
    ("cm", {"model": "tiny-cm", "class_label": 3}, ("image", 32, 32)),
    ("cm-derived-label", {"model": "tiny-cm"}, ("image", 32, 32)),
    ("lcm", {"model": "tiny-lcm", "prompt": P}, ("image", 64, 64)),
    ("if", {"model": "tiny-if", "prompt": P}, ("image", 128, 128)),
    ("img2img", {"task": "edit", "model": "tiny-sd-img2img", "prompt": P, "image_uri": "inputs/src.png", "strength": 0.6}, ("image", 64, 64)),
    ("img2img-resized", {"task": "edit", "model": "tiny-sd-img2img", "prompt": P, "image_uri": "inputs/src.png", "width": 96, "height": 64}, ("image", 96, 64)),
    ("inpaint", {"task": "edit", "model": "tiny-sd-inpaint", "prompt": P, "image_uri": "inputs/src.png", "mask_uri": "inputs/mask.png"}, ("image", 64, 64)),
    ("inpaint-9ch", {"task": "edit", "model": "tiny-sd-inpaint-9ch", "prompt": P, "image_uri": "inputs/src.png", "mask_uri": "inputs/mask.png"}, ("image", 64, 64)),
    ("pix2pix", {"task": "edit", "model": "tiny-pix2pix", "prompt": "make it red", "image_uri": "inputs/src.png", "image_guidance_scale": 1.2}, ("image", 64, 64)),
    ("refiner-edit", {"task": "edit", "model": "tiny-sdxl-refiner", "prompt": P, "image_uri": "inputs/src.png"}, ("image", 64, 64)),
    ("controlnet", {"model": "tiny-sd-controlnet", "prompt": P, "control_image_uris": ["inputs/edges.png"], "controlnet_conditioning_scale": [0.7]}, ("image", 64, 64)),
    ("multicontrolnet", {"model": "tiny-sd-multicontrolnet", "prompt": P, "control_image_uris": ["inputs/edges.png", "inputs/src.png"], "controlnet_conditioning_scale": [0.5, 0.8]}, ("image", 64, 64)),
    ("controlnet-sdxl", {"model": "tiny-sdxl-controlnet", "prompt": P, "control_image_uris": ["inputs/edges.png"]}, ("image", 64, 64)),
    ("multicontrolnet-sdxl", {"model": "tiny-sdxl-multicontrolnet", "prompt": P, "control_image_uris": ["inputs/edges.png", "inputs/src.png"], "controlnet_conditioning_scale": [0.6, 0.9]}, ("image", 64, 64)),
    ("lora-a", {"model": "tiny-sd", "prompt": P, "loras": LORA_A}, ("image", 64, 64)),
    ("lora-b", {"model": "tiny-sd", "prompt": P, "loras": LORA_B}, ("image", 64, 64)),
    ("lora-ab", {"model": "tiny-sd", "prompt": P, "loras": LORA_AB}, ("image", 64, 64)),
    ("lora-a-again", {"model": "tiny-sd", "prompt": P + " again", "loras": LORA_A}, ("image", 64, 64)),
    ("embedding", {"model": "tiny-sd", "prompt": "a <tiny-style> product", "embeddings": ["tiny-embedding-sd"]}, ("image", 64, 64)),
    ("t2v", {"task": "video", "model": "tiny-t2v", "prompt": P}, ("video", 8, 8.0)),
    ("t2v-gif", {"task": "video", "model": "tiny-t2v", "prompt": P, "output_format": "gif", "num_frames": 6}, ("gif", 6, None)),
    ("t2v-zero", {"task": "video", "model": "tiny-t2v-zero", "prompt": P, "fps": 4.0}, ("video", 4, 4.0)),
    ("wan", {"task": "video", "model": "tiny-wan", "prompt": P, "output_format": "webp"}, ("webp-anim", 9, None)),
    ("shap-e", {"task": "mesh", "model": "tiny-shap-e", "prompt": "a vase"}, ("glb",)),
    ("shap-e-ply", {"task": "mesh", "model": "tiny-shap-e", "prompt": "a cup", "output_format": "ply"}, ("ply",)),
    ("shap-e-img", {"task": "mesh", "model": "tiny-shap-e-img2img", "image_uri": "inputs/src.png", "output_format": "obj"}, ("obj",)),
    ("audioldm", {"task": "audio", "model": "tiny-audioldm", "prompt": "a chime", "audio_length_in_s": 1.0}, ("wav", 16000, 1.0)),
    ("audioldm2", {"task": "audio", "model": "tiny-audioldm2", "prompt": "a chime"}, ("wav", 16000, 1.0)),
    ("stable-audio", {"task": "audio", "model": "tiny-stable-audio", "prompt": "a chime", "audio_length_in_s": 0.5}, ("wav", 24000, 0.5)),
]
BAD_ROWS = [
    ("edit-no-image", {"task": "edit", "model": "tiny-sd-img2img", "prompt": P}, "missing_input"),
    ("edit-missing-file", {"task": "edit", "model": "tiny-sd-img2img", "prompt": P, "image_uri": "inputs/nope.png"}, "missing_input"),
    ("edit-not-image", {"task": "edit", "model": "tiny-sd-img2img", "prompt": P, "image_uri": "inputs/notes.txt"}, "invalid_input"),
    ("edit-too-big", {"task": "edit", "model": "tiny-sd-img2img", "prompt": P, "image_uri": "inputs/big.png"}, "invalid_input"),
    ("wrong-task", {"task": "video", "model": "tiny-sd", "prompt": P}, "unsupported_task"),
    ("unknown-task", {"task": "hologram", "model": "tiny-sd", "prompt": P}, "unknown_task"),
    ("mesh-bad-format", {"task": "mesh", "model": "tiny-shap-e", "prompt": P, "output_format": "png"}, "invalid_output_format"),
    ("too-many-frames", {"task": "video", "model": "tiny-t2v", "prompt": P, "num_frames": 500}, "invalid_frames"),
    ("controlnet-missing-image", {"model": "tiny-sd-controlnet", "prompt": P}, "invalid_control_images"),
    ("cm-bad-label", {"model": "tiny-cm", "class_label": 99}, "invalid_class_label"),
    ("lora-unknown", {"model": "tiny-sd", "prompt": P, "loras": [{"uri": "inputs/no-such-lora", "scale": 1.0}]}, "model_load_error"),
    ("lora-not-a-lora", {"model": "tiny-sd", "prompt": P, "loras": [{"uri": "tiny-sd", "scale": 1.0}]}, "invalid_lora"),
    ("sd-no-prompt", {"model": "tiny-sd"}, "missing_prompt"),
]

SCHEMA = pa.schema([
    ("id", pa.string()), ("task", pa.string()), ("model", pa.string()), ("prompt", pa.string()),
    ("output_format", pa.string()), ("image_uri", pa.string()), ("mask_uri", pa.string()), ("strength", pa.float64()),
    ("image_guidance_scale", pa.float64()), ("width", pa.int64()), ("height", pa.int64()), ("num_frames", pa.int64()),
    ("fps", pa.float64()), ("audio_length_in_s", pa.float64()), ("class_label", pa.int64()),
    ("control_image_uris", pa.list_(pa.string())), ("controlnet_conditioning_scale", pa.list_(pa.float64())),
    ("loras", pa.list_(pa.struct([("uri", pa.string()), ("scale", pa.float64())]))),
    ("embeddings", pa.list_(pa.string())), ("seed", pa.int64()), ("batch", pa.string()),
])


def write_inputs(folder) -> None:
    (folder / "inputs").mkdir(parents=True)
    y, x = np.mgrid[0:64, 0:64]
    Image.fromarray(np.stack([x * 4, y * 4, (x + y) * 2], -1).astype(np.uint8)).save(folder / "inputs/src.png")
    mask = np.zeros((64, 64, 4), np.uint8)
    mask[..., 3] = 255
    mask[16:48, 16:48, 3] = 0  # the transparent square is what gets repainted
    Image.fromarray(mask, "RGBA").save(folder / "inputs/mask.png")
    edges = np.zeros((64, 64), np.uint8)
    edges[::8, :] = 255
    Image.fromarray(edges).convert("RGB").save(folder / "inputs/edges.png")
    Image.new("RGB", (200, 200)).save(folder / "inputs/big.png")
    (folder / "inputs/notes.txt").write_text("not an image")


@pytest.fixture(scope="module")
def family_run(tmp_path_factory, tiny_catalog, ray_cluster):
    folder = tmp_path_factory.mktemp("families")
    write_inputs(folder)
    records = [{"id": i, **fields, "seed": 1000 + n, "batch": "good"} for n, (i, fields, _) in enumerate(ROWS)]
    records += [{"id": i, **fields, "batch": "bad"} for i, fields, _ in BAD_ROWS]
    pq.write_table(pa.Table.from_pylist(records, schema=SCHEMA), folder / "manifest.parquet")
    out = str(folder / "out")
    report = run(RenderJob(str(folder / "manifest.parquet"), out, catalog=tiny_catalog, workers=2, batch_size=8,
                           address=ray_cluster, limits=Limits(max_input_pixels=150 * 150)))
    # output_uri is relative to OUT in the results table; these tests open the files.
    return report, {r["id"]: {**r, "output_uri": absolute_uri(out, r["output_uri"])} for r in read_results(out).to_pylist()}


def test_every_family_renders(family_run):
    report, results = family_run
    failed = {i: r["error"] for i, r in results.items() if r["status"] != "ok" and r["batch"] == "good"}
    assert not failed
    assert report.counts == {"ok": len(ROWS), "failed": len(BAD_ROWS)}


@pytest.mark.parametrize("row_id, fields, check", ROWS, ids=[r[0] for r in ROWS])
def test_output_readable_by_standard_tools(family_run, row_id, fields, check):
    _, results = family_run
    r = results[row_id]
    assert r["status"] == "ok", r["error"]
    path = r["output_uri"]
    kind = check[0]
    if kind == "image":
        img = Image.open(path)
        assert img.size == (check[1], check[2]) == (r["width"], r["height"])
        assert img.format == {"webp": "WEBP"}.get(fields.get("output_format"), "PNG")
    elif kind == "video":
        v = probe_video(path)
        assert (v["codec"], v["width"], v["height"], v["frames"], v["fps"]) == ("h264", 64, 64, check[1], check[2])
    elif kind in ("gif", "webp-anim"):
        img = Image.open(path)
        assert img.format == ("GIF" if kind == "gif" else "WEBP") and img.n_frames == check[1]
    elif kind in ("glb", "ply", "obj"):
        mesh = trimesh.load(path, file_type=kind, force="mesh")
        assert len(mesh.faces) > 0 and mesh.is_watertight
    elif kind == "wav":
        with wave.open(path) as w:
            assert w.getframerate() == check[1] and w.getsampwidth() == 2
            assert abs(w.getnframes() / w.getframerate() - check[2]) < 0.01


@pytest.mark.parametrize("row_id, fields, reason", BAD_ROWS, ids=[r[0] for r in BAD_ROWS])
def test_bad_rows_fail_alone_with_a_reason(family_run, row_id, fields, reason):
    _, results = family_run
    r = results[row_id]
    assert r["status"] == "failed" and r["error"].split(":")[0] == reason, r["error"]


def test_adapters_change_outputs_and_switch_back(family_run):
    _, results = family_run
    pixels = {i: np.asarray(Image.open(results[i]["output_uri"])).astype(int) for i in ("sd", "lora-a", "lora-b", "lora-ab", "embedding")}
    for name in ("lora-a", "lora-b", "lora-ab", "embedding"):
        assert np.abs(pixels[name] - pixels["sd"]).max() > 0, name
    assert np.abs(pixels["lora-a"] - pixels["lora-b"]).max() > 0


def test_model_loads_are_bounded(family_run):
    report, _ = family_run
    # Every checkpoint at most once per worker: bases are shared by the entries built over them.
    distinct_sources = 20
    print(f"mixed manifest: {len(ROWS) + len(BAD_ROWS)} rows, {report.model_loads} model loads on 2 workers")
    assert 0 < report.model_loads <= distinct_sources * 2
