"""Tests for pipelines.tiny.cascades: offline tiny cascades and few-step families that load and render like real ones.

Each family is loaded through plain ``DiffusionPipeline.from_pretrained(dir)`` and renders a batch of 2 in one
call with one CPU generator per item; the two cascades run end to end (SDXL base -> refiner on latents,
DeepFloyd IF stage I -> stage II on a tensor).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from diffusers import (
    ConsistencyModelPipeline,
    DiffusionPipeline,
    IFPipeline,
    IFSuperResolutionPipeline,
    LatentConsistencyModelPipeline,
    StableDiffusionXLImg2ImgPipeline,
    StableDiffusionXLPipeline,
)
from PIL import Image

from helpers import load_pipeline
from pipelines.tiny import TINY_MODELS, build_t5_tokenizer, build_tiny_models, write_spec
from pipelines.tiny.cascades import CASCADE_MODELS, CM_NUM_CLASSES, IF_STAGE1_SIZE, IF_STAGE2_SIZE

pytestmark = [pytest.mark.timeout(300), pytest.mark.usefixtures("one_torch_thread")]

EXPECTED_CLASSES = {
    "tiny-sdxl": StableDiffusionXLPipeline,
    "tiny-sdxl-refiner": StableDiffusionXLImg2ImgPipeline,
    "tiny-cm": ConsistencyModelPipeline,
    "tiny-lcm": LatentConsistencyModelPipeline,
    "tiny-if": IFPipeline,
    "tiny-if-2": IFSuperResolutionPipeline,
}
WRITTEN = sorted(name for name, spec in CASCADE_MODELS.items() if spec.write is not None)
PROMPTS = ["a cat and the dog", "a red photo of the thing"]
EDITS = list(zip(PROMPTS, [(20, 120, 200), (200, 60, 90)]))
"""(prompt, input image colour) per item, for the edit models."""
SEEDS = [11, 22]
MAX_BATCH_DIFF = 2
"""Batched vs single calls round differently: at most a couple of 8-bit levels on a few values."""


def _write_all(root: Path) -> None:
    """Writes every cascade model under root/<name>, seeded as build_tiny_models seeds each model."""
    for name in WRITTEN:
        write_spec(CASCADE_MODELS[name], root / name)


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tiny-sdxl (the refined cascade's base) through the real builder, plus every cascade model, once."""
    root = tmp_path_factory.mktemp("tiny-cascades")
    build_tiny_models(root, ["tiny-sdxl"])
    _write_all(root)
    return root


@pytest.fixture(scope="module")
def pipes(tiny_root: Path) -> dict[str, DiffusionPipeline]:
    """Each model loaded through the plain from_pretrained path, as real checkpoints are."""
    return {name: load_pipeline(tiny_root / name) for name in EXPECTED_CLASSES}


def _gens(seeds: list[int]) -> list[torch.Generator]:
    """One CPU generator per item."""
    return [torch.Generator("cpu").manual_seed(s) for s in seeds]


def _arrays(images: list[Image.Image]) -> list[np.ndarray]:
    return [np.asarray(im, dtype=np.int16) for im in images]


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _weights(model_dir: Path) -> dict[str, str]:
    """Relative path -> content hash of every safetensors file under a model dir."""
    return {str(p.relative_to(model_dir)): _sha256(p) for p in sorted(model_dir.rglob("*.safetensors"))}


# --- renders: each takes (pipes, prompts or labels for n items, seeds) and returns PIL images ---------------


def _cm(pipes: dict[str, DiffusionPipeline], seeds: list[int], labels: list[int]) -> list[Image.Image]:
    return pipes["tiny-cm"](
        batch_size=len(seeds), class_labels=labels, generator=_gens(seeds), num_inference_steps=1
    ).images


def _lcm(pipes: dict[str, DiffusionPipeline], seeds: list[int], prompts: list[str]) -> list[Image.Image]:
    return pipes["tiny-lcm"](
        prompts, generator=_gens(seeds), num_inference_steps=2, guidance_scale=8.0, width=64, height=64
    ).images


def _refiner_edit(
    pipes: dict[str, DiffusionPipeline], seeds: list[int], items: list[tuple[str, tuple[int, int, int]]]
) -> list[Image.Image]:
    prompts = [prompt for prompt, _ in items]
    images = [Image.new("RGB", (64, 64), color) for _, color in items]
    return pipes["tiny-sdxl-refiner"](
        prompts, image=images, generator=_gens(seeds), num_inference_steps=4, guidance_scale=5.0, strength=0.5
    ).images


def _if_stage1(pipes: dict[str, DiffusionPipeline], seeds: list[int], prompts: list[str]) -> list[Image.Image]:
    return pipes["tiny-if"](
        prompts, generator=_gens(seeds), num_inference_steps=2, width=IF_STAGE1_SIZE, height=IF_STAGE1_SIZE,
        clean_caption=False,
    ).images


def _if_stage2_edit(
    pipes: dict[str, DiffusionPipeline], seeds: list[int], items: list[tuple[str, tuple[int, int, int]]]
) -> list[Image.Image]:
    prompts = [prompt for prompt, _ in items]
    images = [Image.new("RGB", (IF_STAGE1_SIZE, IF_STAGE1_SIZE), color) for _, color in items]
    return pipes["tiny-if-2"](
        prompts, image=images, generator=_gens(seeds), num_inference_steps=2, clean_caption=False
    ).images


def _sdxl_refined(pipes: dict[str, DiffusionPipeline], seeds: list[int], prompts: list[str]) -> list[Image.Image]:
    """Base to refiner on latents: the base stops at denoising_end, the refiner starts there, same generators."""
    gens = _gens(seeds)
    latents = pipes["tiny-sdxl"](
        prompts, generator=gens, num_inference_steps=4, guidance_scale=5.0, width=64, height=64,
        denoising_end=0.5, output_type="latent",
    ).images
    assert isinstance(latents, torch.Tensor) and latents.shape == (len(prompts), 4, 8, 8)
    return pipes["tiny-sdxl-refiner"](
        prompts, image=latents, generator=gens, num_inference_steps=4, guidance_scale=5.0, denoising_start=0.5
    ).images


def _if_cascade(pipes: dict[str, DiffusionPipeline], seeds: list[int], prompts: list[str]) -> list[Image.Image]:
    """Stage I as a tensor in [-1, 1], then stage II on it with the same prompts and generators."""
    gens = _gens(seeds)
    stage1 = pipes["tiny-if"](
        prompts, generator=gens, num_inference_steps=2, width=IF_STAGE1_SIZE, height=IF_STAGE1_SIZE,
        output_type="pt", clean_caption=False,
    ).images
    assert isinstance(stage1, torch.Tensor) and stage1.shape == (len(prompts), 3, IF_STAGE1_SIZE, IF_STAGE1_SIZE)
    assert -1.0 <= float(stage1.min()) and float(stage1.max()) <= 1.0
    return pipes["tiny-if-2"](
        prompts, image=stage1, generator=gens, num_inference_steps=2, clean_caption=False
    ).images


Render = Callable[[dict[str, DiffusionPipeline], list[int], list[Any]], list[Image.Image]]
RENDERS: dict[str, tuple[Render, list[Any], int]] = {
    "tiny-cm": (_cm, [3, 7], 32),
    "tiny-lcm": (_lcm, PROMPTS, 64),
    "tiny-sdxl-refiner": (_refiner_edit, EDITS, 64),
    "tiny-if": (_if_stage1, PROMPTS, IF_STAGE1_SIZE),
    "tiny-if-2": (_if_stage2_edit, EDITS, IF_STAGE2_SIZE),
    "tiny-sdxl-refined": (_sdxl_refined, PROMPTS, 64),
    "tiny-if+tiny-if-2": (_if_cascade, PROMPTS, IF_STAGE2_SIZE),
}


# --- specs and files ---------------------------------------------------------------------------------------


def test_specs_are_well_formed() -> None:
    assert set(CASCADE_MODELS) == {
        "tiny-sdxl-refiner", "tiny-sdxl-refined", "tiny-cm", "tiny-lcm", "tiny-if", "tiny-if-2"
    }
    for name in set(CASCADE_MODELS) & set(TINY_MODELS):  # once registered there, it must be the same spec
        assert TINY_MODELS[name] is CASCADE_MODELS[name], name
    known = set(CASCADE_MODELS) | set(TINY_MODELS)
    for name, spec in CASCADE_MODELS.items():
        entry = spec.entry
        assert entry["kind"] == "pipeline"
        assert entry["tasks"] and set(entry["tasks"]) <= {"image", "edit", "video", "mesh", "audio"}
        assert isinstance(entry.get("defaults", {}), dict)
        assert ("source" in entry) == (spec.write is None), name
        if "source" in entry:
            assert entry["source"] in known
        for stage in entry.get("stages", []):
            assert stage in CASCADE_MODELS and CASCADE_MODELS[stage].entry["tasks"] == ["edit"], stage
    refined = CASCADE_MODELS["tiny-sdxl-refined"].entry
    assert refined["source"] == "tiny-sdxl" and refined["stages"] == ["tiny-sdxl-refiner"]
    assert CASCADE_MODELS["tiny-if"].entry["stages"] == ["tiny-if-2"]
    assert CASCADE_MODELS["tiny-cm"].entry["defaults"] == {"num_inference_steps": 1}


def test_t5_tokenizer_is_t5_shaped() -> None:
    tok = build_t5_tokenizer()
    assert (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2)
    assert tok.model_max_length == 77
    ids = tok("a cat and the dog").input_ids
    assert ids[-1] == tok.eos_token_id and tok.unk_token_id not in ids
    assert tok.decode(ids, skip_special_tokens=True) == "a cat and the dog"
    padded = tok(["a cat", "zz"], padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    assert padded.input_ids.shape == (2, 77)


@pytest.mark.parametrize("name", WRITTEN)
def test_loads_as_right_class_with_safetensors_only(
    name: str, tiny_root: Path, pipes: dict[str, DiffusionPipeline]
) -> None:
    assert type(pipes[name]) is EXPECTED_CLASSES[name]
    model_dir = tiny_root / name
    assert list(model_dir.rglob("*.safetensors")), "no safetensors weights saved"
    assert not [p for p in model_dir.rglob("*") if p.suffix in (".bin", ".pt", ".pth", ".ckpt", ".pkl")]


def test_builds_are_byte_identical(tiny_root: Path, tmp_path: Path) -> None:
    _write_all(tmp_path)
    for name in WRITTEN:
        assert _weights(tmp_path / name) == _weights(tiny_root / name), name


def test_shared_components_match_their_source_byte_for_byte(tiny_root: Path) -> None:
    """The refiner reuses tiny-sdxl's VAE and second text encoder, IF stage II stage I's T5, as the real ones do."""
    for component in ("vae", "text_encoder_2"):
        assert _weights(tiny_root / "tiny-sdxl-refiner" / component) == _weights(tiny_root / "tiny-sdxl" / component)
    assert _weights(tiny_root / "tiny-if-2" / "text_encoder") == _weights(tiny_root / "tiny-if" / "text_encoder")


def test_refiner_is_configured_like_the_sdxl_refiner(tiny_root: Path, pipes: dict[str, DiffusionPipeline]) -> None:
    refiner = pipes["tiny-sdxl-refiner"]
    assert refiner.text_encoder is None and refiner.tokenizer is None
    assert refiner.config.requires_aesthetics_score is True
    index = json.loads((tiny_root / "tiny-sdxl-refiner" / "model_index.json").read_text())
    assert index["text_encoder"] == [None, None] and index["requires_aesthetics_score"] is True
    unet = refiner.unet.config
    assert unet.projection_class_embeddings_input_dim == (
        5 * unet.addition_time_embed_dim + refiner.text_encoder_2.config.projection_dim
    )
    assert unet.cross_attention_dim == refiner.text_encoder_2.config.hidden_size
    own = {k: v for k, v in refiner.vae.config.items() if k != "_name_or_path"}
    assert own == {k: v for k, v in pipes["tiny-sdxl"].vae.config.items() if k != "_name_or_path"}


def test_families_have_their_defining_config(pipes: dict[str, DiffusionPipeline]) -> None:
    assert pipes["tiny-cm"].unet.config.num_class_embeds == CM_NUM_CLASSES
    assert pipes["tiny-lcm"].unet.config.time_cond_proj_dim is not None
    stage1, stage2 = pipes["tiny-if"].unet.config, pipes["tiny-if-2"].unet.config
    assert stage1.addition_embed_type == stage2.addition_embed_type == "text"
    assert stage1.encoder_hid_dim == pipes["tiny-if"].text_encoder.config.d_model
    assert (stage1.in_channels, stage2.in_channels, stage2.class_embed_type) == (3, 6, "timestep")
    assert stage2.sample_size == IF_STAGE2_SIZE
    for name in ("tiny-if", "tiny-if-2"):
        assert pipes[name].watermarker is None and pipes[name].safety_checker is None


# --- renders -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(RENDERS))
def test_batch_render_sizes_determinism_and_per_item_seeds(name: str, pipes: dict[str, DiffusionPipeline]) -> None:
    render, inputs, size = RENDERS[name]
    first = render(pipes, SEEDS, inputs)
    assert [im.size for im in first] == [(size, size)] * 2
    assert all(im.mode == "RGB" for im in first)
    again = render(pipes, SEEDS, inputs)
    for a, b in zip(_arrays(first), _arrays(again)):
        np.testing.assert_array_equal(a, b)  # same seeds, same call: identical
    # Item 1 alone with its own seed renders what it rendered in the batch (up to batch rounding),
    # so rows are reproducible however a job batches them.
    alone = render(pipes, SEEDS[1:], inputs[1:])
    assert int(np.abs(_arrays(alone)[0] - _arrays(first)[1]).max()) <= MAX_BATCH_DIFF
    other_seed = render(pipes, SEEDS[:1], inputs[1:])  # the seed, not the batch slot, decides the noise
    assert int(np.abs(_arrays(other_seed)[0] - _arrays(first)[1]).max()) > 10 * MAX_BATCH_DIFF


def test_refiner_changes_the_base_result(pipes: dict[str, DiffusionPipeline]) -> None:
    """The refined cascade is not the base alone: the refiner finishes the base's half-denoised latents."""
    base = pipes["tiny-sdxl"](
        PROMPTS, generator=_gens(SEEDS), num_inference_steps=4, guidance_scale=5.0, width=64, height=64
    ).images
    refined = _sdxl_refined(pipes, SEEDS, PROMPTS)
    assert any(not np.array_equal(a, b) for a, b in zip(_arrays(base), _arrays(refined)))


def test_if_stage2_is_conditioned_on_stage1(pipes: dict[str, DiffusionPipeline]) -> None:
    """Stage II's output follows stage I's image: the same call on a different stage-I image differs."""
    stage1 = pipes["tiny-if"](
        PROMPTS[:1], generator=_gens(SEEDS[:1]), num_inference_steps=2, output_type="pt", clean_caption=False
    ).images
    assert stage1.shape[-1] == IF_STAGE1_SIZE  # width/height default to stage I's sample_size
    outputs = [
        pipes["tiny-if-2"](
            PROMPTS[:1], image=image, generator=_gens(SEEDS[:1]), num_inference_steps=2, clean_caption=False
        ).images[0]
        for image in (stage1, -stage1)
    ]
    assert outputs[0].size == (IF_STAGE2_SIZE, IF_STAGE2_SIZE)
    assert not np.array_equal(np.asarray(outputs[0]), np.asarray(outputs[1]))
