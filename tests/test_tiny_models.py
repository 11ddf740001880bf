"""Tests for pipelines.tiny (the SD/SDXL family and the builder): offline tiny pipelines that load and render like real checkpoints."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from diffusers import DiffusionPipeline, StableDiffusionPipeline, StableDiffusionXLPipeline
from PIL import Image

from helpers import load_pipeline
from pipelines.tiny import MARKER_FILE, TINY_MODELS, build_clip_tokenizer, build_tiny_models

pytestmark = [pytest.mark.timeout(300), pytest.mark.usefixtures("one_torch_thread")]

EXPECTED_CLASSES = {"tiny-sd": StableDiffusionPipeline, "tiny-sdxl": StableDiffusionXLPipeline}
PROMPT = "a cat and the thing"


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Builds both tiny models once for the module."""
    root = tmp_path_factory.mktemp("tiny-models")
    build_tiny_models(root)
    return root


@pytest.fixture(scope="module")
def pipes(tiny_root: Path) -> dict[str, DiffusionPipeline]:
    """Loads each built model through the plain from_pretrained path, as real checkpoints are loaded."""
    return {name: load_pipeline(tiny_root / name) for name in EXPECTED_CLASSES}


def _render(pipe: DiffusionPipeline, prompt: str | list[str], seeds: list[int], **kwargs) -> list[Image.Image]:
    """Renders with one CPU generator per seed, 2 steps, 64x64 unless overridden."""
    generators = [torch.Generator("cpu").manual_seed(s) for s in seeds]
    params = {"num_inference_steps": 2, "width": 64, "height": 64, **kwargs}
    return pipe(prompt, generator=generators[0] if len(generators) == 1 else generators, **params).images


def _sha256(path: Path) -> str:
    """Content hash of one file, to compare weights across builds."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_registry_has_required_models() -> None:
    assert {"tiny-sd", "tiny-sdxl"} <= set(TINY_MODELS)


@pytest.mark.parametrize("name", sorted(EXPECTED_CLASSES))
def test_loads_as_right_class_with_safetensors_only(
    name: str, tiny_root: Path, pipes: dict[str, DiffusionPipeline]
) -> None:
    assert type(pipes[name]) is EXPECTED_CLASSES[name]
    model_dir = tiny_root / name
    assert (model_dir / MARKER_FILE).is_file()
    assert list(model_dir.rglob("*.safetensors")), "no safetensors weights saved"
    assert not list(model_dir.rglob("*.bin"))
    assert not list(model_dir.rglob("*.pt")) and not list(model_dir.rglob("*.pth"))


@pytest.mark.parametrize("name", sorted(EXPECTED_CLASSES))
def test_render_is_64px_and_seed_deterministic(name: str, pipes: dict[str, DiffusionPipeline]) -> None:
    first = _render(pipes[name], PROMPT, [1])
    second = _render(pipes[name], PROMPT, [1])
    assert len(first) == 1 and isinstance(first[0], Image.Image)
    assert first[0].size == (64, 64)
    assert np.array_equal(np.asarray(first[0]), np.asarray(second[0]))


@pytest.mark.parametrize("name", sorted(EXPECTED_CLASSES))
def test_two_prompts_two_generators_give_two_images(name: str, pipes: dict[str, DiffusionPipeline]) -> None:
    images = _render(pipes[name], [PROMPT, "of things"], [1, 2])
    assert len(images) == 2
    assert all(im.size == (64, 64) for im in images)


def test_sd_renders_non_square_size(pipes: dict[str, DiffusionPipeline]) -> None:
    (image,) = _render(pipes["tiny-sd"], PROMPT, [1], width=128, height=96)
    assert image.size == (128, 96)


def test_rebuild_is_noop_and_catalog_lists_both(tiny_root: Path) -> None:
    before = {
        p: (p.stat().st_ino, p.stat().st_mtime_ns) for name in EXPECTED_CLASSES for p in (tiny_root / name).rglob("*")
    }
    catalog_path = build_tiny_models(tiny_root, ["tiny-sd", "tiny-sdxl"])
    after = {
        p: (p.stat().st_ino, p.stat().st_mtime_ns) for name in EXPECTED_CLASSES for p in (tiny_root / name).rglob("*")
    }
    assert after == before
    assert catalog_path == tiny_root / "catalog.yaml"
    assert not [p for p in tiny_root.iterdir() if p.name.endswith(".tmp")]
    catalog = yaml.safe_load(catalog_path.read_text())
    assert catalog["default_model"] == "tiny-sd"
    assert set(catalog["models"]) == {"tiny-sd", "tiny-sdxl"}
    for name, entry in catalog["models"].items():
        assert entry["kind"] == "pipeline"
        assert entry["tasks"] == ["image"]
        assert (catalog_path.parent / entry["source"] / "model_index.json").is_file()
        assert entry["defaults"] == {"num_inference_steps": 4, "guidance_scale": 5.0, "width": 64, "height": 64}


def test_subset_build_is_deterministic_and_lists_only_what_was_built(
    tiny_root: Path, tmp_path: Path
) -> None:
    catalog = yaml.safe_load(build_tiny_models(tmp_path, ["tiny-sdxl"]).read_text())
    assert catalog["default_model"] == "tiny-sdxl"
    assert list(catalog["models"]) == ["tiny-sdxl"]
    assert not (tmp_path / "tiny-sd").exists()
    for weights in sorted((tiny_root / "tiny-sdxl").rglob("*.safetensors")):
        rebuilt = tmp_path / "tiny-sdxl" / weights.relative_to(tiny_root / "tiny-sdxl")
        assert _sha256(rebuilt) == _sha256(weights), f"{rebuilt} differs between builds"


def test_unknown_model_name_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(KeyError):
        build_tiny_models(tmp_path, ["no-such-model"])
    assert not (tmp_path / "catalog.yaml").exists()


def test_clip_tokenizer_is_byte_level_with_77_context(tmp_path: Path) -> None:
    tokenizer = build_clip_tokenizer(tmp_path)
    assert {p.name for p in tmp_path.iterdir()} >= {"vocab.json", "merges.txt", "tokenizer_config.json"}
    assert tokenizer.model_max_length == 77
    assert len(tokenizer) > 2 * 256
    ids = tokenizer("the cat ünïcode 123!").input_ids
    assert ids[0] == tokenizer.convert_tokens_to_ids("<|startoftext|>")
    assert ids[-1] == tokenizer.convert_tokens_to_ids("<|endoftext|>")
    assert tokenizer.unk_token_id not in ids[1:-1], "every byte should have its own token"
    assert tokenizer.convert_ids_to_tokens(ids[1:3]) == ["the</w>", "cat</w>"]
    padded = tokenizer(PROMPT, padding="max_length", max_length=tokenizer.model_max_length).input_ids
    assert len(padded) == 77


def test_the_default_catalog_is_found_without_importing_the_factory(tmp_path):
    """A build stamped with the factory's hash is taken as is, in a process that never imports torch or diffusers;
    a stamp from other factory code, or a stamped model gone, is not."""
    import json
    import subprocess
    import sys

    from pipelines.tiny.cached import STAMP_FILE, factory_hash, is_current

    root = tmp_path / "tiny-models"
    (root / "tiny-a").mkdir(parents=True)
    (root / "tiny-a" / MARKER_FILE).write_text("{}")
    (root / "catalog.yaml").write_text("models: {}\n")
    (root / STAMP_FILE).write_text(json.dumps({"factory": factory_hash(), "models": ["tiny-a"]}))
    code = ("import sys; from pipelines.tiny import default_catalog_path; print(default_catalog_path()); "
            "print(sorted(m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules))")
    env = {**os.environ, "RENDERFLEET_HOME": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60,
                         cwd=Path(__file__).resolve().parent.parent)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("\n")[:2] == [str(root / "catalog.yaml"), "[]"], out.stdout
    assert is_current(root)
    (root / STAMP_FILE).write_text(json.dumps({"factory": "an older factory", "models": ["tiny-a"]}))
    assert not is_current(root)
    (root / STAMP_FILE).write_text(json.dumps({"factory": factory_hash(), "models": ["tiny-a", "tiny-gone"]}))
    assert not is_current(root)
