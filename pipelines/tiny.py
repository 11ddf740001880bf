"""Tiny random-weight diffusers pipelines, built fully offline.

Tests, CI and the embedded demo need real pipelines that load through the
ordinary ``DiffusionPipeline.from_pretrained(dir)`` path without any Hub
access.  This module builds small, deterministic, random-weight pipelines
from configs, saves each with ``save_pretrained(..., safe_serialization=True)``
and writes a ``catalog.yaml`` that the rest of renderfleet reads like any
other model catalog.  Nothing here is special-cased at load time: a built
directory is indistinguishable from a (very small) real checkpoint.

Builds are deterministic (torch is seeded before each model), idempotent
(a marker file written last marks a complete build) and safe for concurrent
callers (each model is built in a temp dir beside its target and renamed into
place; the catalog is written to a temp file and ``os.replace``d).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from diffusers import (
    AutoencoderKL,
    DiffusionPipeline,
    EulerDiscreteScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
)

__all__ = [
    "TINY_MODELS",
    "MARKER_FILE",
    "CATALOG_FILE",
    "build_clip_tokenizer",
    "build_tiny_models",
]

MARKER_FILE = ".renderfleet-tiny-complete"
"""Written last into a model dir, so its presence means the build finished."""

CATALOG_FILE = "catalog.yaml"
"""Catalog file name under the build root."""

SEED = 0
"""Seed for every model's random weights, so each build is byte-identical."""

MODEL_MAX_LENGTH = 77
"""CLIP's context length; text encoders and tokenizers must agree on it."""

_SPECIAL_TOKENS = ("<|startoftext|>", "<|endoftext|>")
_MERGES = (
    ("t", "h"),
    ("th", "e</w>"),
    ("a", "n"),
    ("an", "d</w>"),
    ("i", "n"),
    ("in", "g</w>"),
    ("o", "f</w>"),
    ("c", "a"),
    ("ca", "t</w>"),
)
_DEFAULTS: dict[str, Any] = {
    "num_inference_steps": 4,
    "guidance_scale": 5.0,
    "width": 64,
    "height": 64,
}


def _bytes_to_unicode() -> dict[int, str]:
    """CLIP/GPT-2's reversible byte -> printable unicode mapping, so every byte has a token."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    codes = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in codes)))


def build_clip_tokenizer(directory: Path) -> CLIPTokenizer:
    """Writes a tiny byte-level CLIP tokenizer (vocab.json, merges.txt, config) and loads it, since the real one needs the Hub."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    byte_chars = list(_bytes_to_unicode().values())
    tokens = byte_chars + [c + "</w>" for c in byte_chars] + ["".join(m) for m in _MERGES]
    tokens += list(_SPECIAL_TOKENS)
    vocab = {tok: i for i, tok in enumerate(dict.fromkeys(tokens))}
    (directory / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    merges = "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in _MERGES)
    (directory / "merges.txt").write_text(merges, encoding="utf-8")
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": MODEL_MAX_LENGTH,
        "bos_token": _SPECIAL_TOKENS[0],
        "eos_token": _SPECIAL_TOKENS[1],
        "unk_token": _SPECIAL_TOKENS[1],
        "pad_token": _SPECIAL_TOKENS[1],
        "do_lower_case": True,
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    return CLIPTokenizer.from_pretrained(str(directory))


def sdxl_unet(projection_input_dim: int, cross_attention_dim: int, addition_time_embed_dim: int = 8) -> UNet2DConditionModel:
    """The tiny SDXL-style UNet shared by the base and the refiner; they differ only in their conditioning widths."""
    return UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(32, 64),
        layers_per_block=1,
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        transformer_layers_per_block=(1, 2),
        addition_embed_type="text_time",
        addition_time_embed_dim=addition_time_embed_dim,
        projection_class_embeddings_input_dim=projection_input_dim,
        cross_attention_dim=cross_attention_dim,
        norm_num_groups=32,
    )


def _tiny_vae(channels: int = 3) -> AutoencoderKL:
    """A 4-block VAE (8x downscale like real SD): a 2-block one puts attention on 4x more tokens and is 50-200x slower.

    channels=1 gives the mel-spectrogram VAE of the AudioLDM family.
    """
    return AutoencoderKL(
        in_channels=channels,
        out_channels=channels,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 16, 16, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=64,
    )


def _tiny_clip_text_config(vocab_size: int, **overrides: Any) -> CLIPTextConfig:
    """A 2-layer, 32-wide CLIP text config whose vocab and context match the local tokenizer."""
    params: dict[str, Any] = {
        "vocab_size": vocab_size,
        "hidden_size": 32,
        "intermediate_size": 37,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "max_position_embeddings": MODEL_MAX_LENGTH,
        "bos_token_id": 0,
        "eos_token_id": 2,
        "pad_token_id": 1,
        "hidden_act": "gelu",
        "projection_dim": 32,
    }
    params.update(overrides)
    return CLIPTextConfig(**params)


def _tokenizer_ids(tokenizer: CLIPTokenizer) -> dict[str, int]:
    """Special-token ids from the tokenizer, so the text encoder finds EOS where the tokenizer puts it."""
    return {
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }


def _scheduler() -> EulerDiscreteScheduler:
    """SD's standard noise schedule; Euler works with any step count, which tests need (2 steps)."""
    return EulerDiscreteScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        timestep_spacing="leading",
        steps_offset=1,
    )


def build_tiny_sd() -> StableDiffusionPipeline:
    """Tiny StableDiffusionPipeline (64x64 default) for fast, offline SD-path tests."""
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(32, 64),
        layers_per_block=1,
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=32,
    )
    vae = _tiny_vae()
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = build_clip_tokenizer(Path(tmp))
    text_encoder = CLIPTextModel(_tiny_clip_text_config(len(tokenizer), **_tokenizer_ids(tokenizer)))
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        image_encoder=None,
        requires_safety_checker=False,
    )


def build_tiny_sdxl() -> StableDiffusionXLPipeline:
    """Tiny StableDiffusionXLPipeline (two text encoders, text_time conditioning) for the SDXL path."""
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = build_clip_tokenizer(Path(tmp) / "t1")
        tokenizer_2 = build_clip_tokenizer(Path(tmp) / "t2")
    te1_config = _tiny_clip_text_config(len(tokenizer), hidden_size=32, **_tokenizer_ids(tokenizer))
    te2_config = _tiny_clip_text_config(
        len(tokenizer_2), hidden_size=32, projection_dim=32, **_tokenizer_ids(tokenizer_2)
    )
    text_encoder = CLIPTextModel(te1_config)
    text_encoder_2 = CLIPTextModelWithProjection(te2_config)
    addition_time_embed_dim = 8
    # 6 size/crop ids (original h,w; crop top,left; target h,w), each embedded, plus the pooled text embedding.
    projection_input_dim = 6 * addition_time_embed_dim + te2_config.projection_dim
    unet = sdxl_unet(projection_input_dim, te1_config.hidden_size + te2_config.hidden_size, addition_time_embed_dim)
    vae = _tiny_vae()
    return StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=unet,
        scheduler=_scheduler(),
        image_encoder=None,
        feature_extractor=None,
        force_zeros_for_empty_prompt=True,
    )


T5_WORDS = ("a", "the", "and", "of", "cat", "dog", "photo", "red", "blue", "in", "on", "with", "sound", "music",
            "rain", "bird", "video")
T5_CHARS = "abcdefghijklmnopqrstuvwxyz0123456789.,!?'-"


def build_t5_tokenizer() -> Any:
    """A tiny T5 tokenizer (Unigram, Metaspace, `</s>` appended, 77 tokens max) for every T5-conditioned family.

    Under transformers 5 ``T5TokenizerFast(vocab=[(piece, score), ...])`` builds exactly that pipeline
    without sentencepiece; ids: <pad>=0, </s>=1, <unk>=2.
    """
    from transformers import T5TokenizerFast

    pieces: list[tuple[str, float]] = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    pieces += [("\u2581" + w, -3.0) for w in T5_WORDS]
    pieces += [("\u2581" + c, -6.0) for c in T5_CHARS if c not in T5_WORDS]
    pieces += [(c, -5.0) for c in T5_CHARS]
    return T5TokenizerFast(vocab=pieces, extra_ids=0, model_max_length=MODEL_MAX_LENGTH)


def seeded(builder: Callable[[], Any]) -> Callable[[], Any]:
    """Runs a builder under SEED in a forked RNG: byte-identical builds whoever calls, the caller's RNG untouched."""

    def build() -> Any:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(SEED)
            return builder()

    build.__name__ = builder.__name__
    return build


@dataclass(frozen=True)
class TinySpec:
    """How to write one tiny model into a directory, and its catalog entry (without `source`)."""

    write: Callable[[Path], None] | None
    entry: dict[str, Any]
    """`source` defaults to the model's own directory; an entry over another tiny model's
    directory (e.g. img2img over tiny-sd through `pipeline_class`) names it and has no writer."""


def save_pipeline(builder: Callable[[], DiffusionPipeline]) -> Callable[[Path], None]:
    """A writer that builds a pipeline and saves it as safetensors, tokenizer files included."""

    def write(directory: Path) -> None:
        pipe = builder()
        pipe.save_pretrained(str(directory), safe_serialization=True)
        _write_bpe_files(pipe, directory)

    return write


def image_entry(**extra: Any) -> dict[str, Any]:
    """A text-to-image catalog entry with the tiny defaults."""
    return {"kind": "pipeline", "tasks": ["image"], "defaults": dict(_DEFAULTS), **extra}


TINY_MODELS: dict[str, TinySpec] = {
    "tiny-sd": TinySpec(save_pipeline(build_tiny_sd), image_entry()),
    "tiny-sdxl": TinySpec(save_pipeline(build_tiny_sdxl), image_entry()),
}
"""Name -> spec for every tiny model; the name is also its directory and catalog key."""


FAMILY_MODULES = ("tiny_edits", "tiny_cascades", "tiny_video", "tiny_audio", "tiny_mesh", "tiny_safety")
"""Modules under pipelines/ whose `*_MODELS` dicts add families to the factory."""


def all_tiny_models() -> dict[str, TinySpec]:
    """Every tiny model of every family (imported lazily: family modules import this one)."""
    import importlib

    models = dict(TINY_MODELS)
    for module_name in FAMILY_MODULES:
        try:
            module = importlib.import_module(f"pipelines.{module_name}")
        except ModuleNotFoundError as e:
            if e.name != f"pipelines.{module_name}":
                raise
            continue
        for attr, value in vars(module).items():
            if attr.endswith("_MODELS") and isinstance(value, dict):
                models.update(value)
    return models


def _is_complete(model_dir: Path) -> bool:
    """A model dir counts as built only once its marker (written last) exists."""
    return (model_dir / MARKER_FILE).is_file()


def _write_bpe_files(pipe: DiffusionPipeline, directory: Path) -> None:
    """Adds vocab.json/merges.txt beside each saved tokenizer.json, as real checkpoints have, so slow-tokenizer loaders work too."""
    for component, value in pipe.components.items():
        backend = getattr(value, "backend_tokenizer", None)
        folder = directory / component
        if backend is None or not folder.is_dir() or (folder / "vocab.json").exists():
            continue
        backend.model.save(str(folder))


def _read_umask() -> int:
    """The process umask (read by setting and restoring it), to give renamed temp dirs normal permissions."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_UMASK = _read_umask()
"""Read once at import, since reading it briefly changes a process-wide setting."""


def _build_one(root: Path, name: str) -> Path:
    """Builds one model into a temp dir beside its target and renames it into place, so readers never see half a build."""
    target = root / name
    spec = all_tiny_models()[name]
    if spec.write is None or _is_complete(target):
        return target
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", suffix=".tmp", dir=root))
    try:
        with torch.random.fork_rng(devices=[]):  # Seed for identical weights without disturbing the caller's RNG.
            torch.manual_seed(SEED)
            spec.write(tmp)
        os.chmod(tmp, 0o777 & ~_UMASK)  # mkdtemp makes it 0700; the final dir should be readable like any other.
        (tmp / MARKER_FILE).write_text(json.dumps({"name": name, "seed": SEED}) + "\n", encoding="utf-8")
        if target.exists() and not _is_complete(target):
            # A leftover from a crashed build (no marker): replace it.
            shutil.rmtree(target, ignore_errors=True)
        try:
            os.rename(tmp, target)
        except OSError:
            # Another caller finished first (target now a non-empty dir); keep theirs if complete.
            if not _is_complete(target):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _catalog(names: list[str]) -> dict[str, Any]:
    """The catalog mapping for the built models; paths are relative to the catalog's directory."""
    pipelines = [n for n in names if all_tiny_models()[n].entry.get("kind", "pipeline") == "pipeline"]
    if not pipelines:
        raise ValueError(f"a catalog needs at least one pipeline; {', '.join(names)} has none (add e.g. tiny-sd)")
    default = "tiny-sd" if "tiny-sd" in pipelines else pipelines[0]
    catalog: dict[str, Any] = {"default_model": default}
    if "tiny-safety-checker" in names:
        catalog["safety"] = {"checker": "tiny-safety-checker"}
    catalog["models"] = {name: {"source": name, **all_tiny_models()[name].entry} for name in names}
    return catalog


def _write_atomic(path: Path, text: str) -> None:
    """Writes via a temp file and os.replace, so concurrent readers see the old or new file, never a partial one."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes it 0600; readers may be other users.
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def build_tiny_models(root: str | Path, names: Iterable[str] | None = None) -> Path:
    """Builds each named tiny model (all when None) under root/<name>/ and writes root/catalog.yaml; returns the catalog path."""
    from pipelines.loading import quiet_hf_progress

    quiet_hf_progress()
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    known = all_tiny_models()
    selected = list(dict.fromkeys(known if names is None else names))
    unknown = [n for n in selected if n not in known]
    if unknown:
        raise KeyError(f"unknown tiny model(s) {unknown}; known: {sorted(known)}")
    # Entries over another model's directory need that model, and cascades their stages.
    for name in selected:  # grows while iterating: dependencies of dependencies too
        entry = known[name].entry
        for dep in [entry.get("source")] + list(entry.get("stages", [])) + list(entry.get("controlnets", [])):
            if dep in known and dep not in selected:
                selected.append(dep)
    if not selected:
        raise ValueError("no tiny models selected")
    for name in selected:
        _build_one(root, name)
    catalog_path = root / CATALOG_FILE
    _write_atomic(catalog_path, yaml.safe_dump(_catalog(selected), sort_keys=False, default_flow_style=None))
    return catalog_path
