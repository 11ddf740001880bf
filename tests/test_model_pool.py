"""The per-actor model pool evicts before it places, and rows are checked before any model loads.

Real tiny checkpoints, loaded through from_pretrained, on the CPU device (no Ray).
"""

from __future__ import annotations

import pytest
import torch

from cluster.model_pool import ModelPool
from cluster.renderer import Renderer, RendererConfig
from pipelines.catalog import Catalog
from pipelines.loading import load_base, memory_bytes

pytestmark = pytest.mark.timeout(240)

# Three checkpoints of different sizes (each its own source, so none shares weights).
MODELS = ("tiny-sd", "tiny-sdxl", "tiny-pix2pix")


@pytest.fixture(scope="module")
def sizes(tiny_catalog) -> dict[str, int]:
    catalog = Catalog.load(tiny_catalog)
    return {n: memory_bytes(load_base(catalog.get(n).source, None, torch.float32)) for n in MODELS}


def test_a_switch_never_holds_two_models_over_a_one_model_budget(tiny_catalog, sizes):
    catalog = Catalog.load(tiny_catalog)
    budget = max(sizes.values())  # room for the largest, never for two
    assert min(sizes.values()) * 2 > budget or sum(sorted(sizes.values())[:2]) > budget
    pool = ModelPool(catalog, torch.device("cpu"), budget)
    order = ["tiny-sd", "tiny-sdxl", "tiny-pix2pix", "tiny-sd", "tiny-sd", "tiny-pix2pix"]
    for name in order:
        pipe = pool.pipeline(catalog.pipeline(name))
        assert pipe.unet.device.type == "cpu"
        assert pool.resident_bytes() <= budget
    places = [e for e in pool.events if e[0] == "place"]
    # Every placement happened with the old model already gone: resident bytes after placing stay in budget.
    assert all(after <= budget for _, _, _, after in places), list(pool.events)
    assert [name for _, name, _, _ in places] == ["tiny-sd", "tiny-sdxl", "tiny-pix2pix", "tiny-sd", "tiny-pix2pix"]
    assert [size for _, _, size, _ in places] == [sizes[n] for n in ("tiny-sd", "tiny-sdxl", "tiny-pix2pix", "tiny-sd", "tiny-pix2pix")]
    # Loads counted as before: one per checkpoint placed (the repeated tiny-sd was a hit).
    assert pool.loads == 5
    evictions = [e for e in pool.events if e[0] == "evict"]
    assert len(evictions) == 4
    # An eviction always comes before the placement that needed the room.
    kinds = [e[0] for e in pool.events]
    assert kinds == ["place", "evict", "place", "evict", "place", "evict", "place", "evict", "place"]


def test_entries_over_one_checkpoint_share_it(tiny_catalog):
    catalog = Catalog.load(tiny_catalog)
    pool = ModelPool(catalog, torch.device("cpu"), 2**40)
    text = pool.pipeline(catalog.pipeline("tiny-sd"))
    edit = pool.pipeline(catalog.pipeline("tiny-sd-img2img"))
    assert edit.unet is text.unet and pool.loads == 1


def test_a_block_of_invalid_rows_loads_no_model(tiny_catalog, tmp_path):
    renderer = Renderer(RendererConfig(catalog_path=tiny_catalog, out=str(tmp_path / "out"), torch_threads=1,
                                       input_base=str(tmp_path)))
    bad = [
        {"id": "steps", "prompt": "p", "num_inference_steps": 0},
        {"id": "size", "prompt": "p", "width": 65},
        {"id": "guidance", "prompt": "p", "guidance_scale": -1.0},
        {"id": "frames", "task": "video", "model": "tiny-t2v", "prompt": "p", "num_frames": 100_000},
        {"id": "fps", "task": "video", "model": "tiny-t2v", "prompt": "p", "fps": 0.0},
        {"id": "audio", "task": "audio", "model": "tiny-audioldm", "prompt": "p", "audio_length_in_s": 10_000.0},
        {"id": "format", "prompt": "p", "output_format": "bmp"},
        {"id": "input", "task": "edit", "model": "tiny-sd-img2img", "prompt": "p", "image_uri": str(tmp_path / "nope.png")},
        {"id": "strength", "task": "edit", "model": "tiny-sd-img2img", "prompt": "p", "strength": 2.0,
         "image_uri": str(tmp_path / "nope.png")},
        {"id": "prompt", "prompt": "x" * 10_001},
        {"id": "model", "prompt": "p", "model": "no-such-model"},
    ]
    results = renderer.render_rows(bad)
    assert [r["status"] for r in results] == ["failed"] * len(bad)
    codes = {r["id"]: r["error"].split(":")[0] for r in results}
    assert codes == {"steps": "invalid_steps", "size": "invalid_size", "guidance": "invalid_guidance",
                     "frames": "invalid_frames", "fps": "invalid_fps", "audio": "invalid_audio_length",
                     "format": "invalid_output_format", "input": "missing_input", "strength": "invalid_strength",
                     "prompt": "invalid_prompt", "model": "unknown_model"}
    assert renderer.pool.loads == 0
    # A good row among them still loads exactly its model.
    results = renderer.render_rows(bad[:2] + [{"id": "ok", "prompt": "a cat"}])
    assert [r["status"] for r in results] == ["failed", "failed", "ok"] and renderer.pool.loads == 1
