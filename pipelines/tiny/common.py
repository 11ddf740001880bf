"""The building blocks every tiny family shares: tokenizers, text encoders, UNets, the VAE, seeding, saving.

Builds are deterministic because torch is seeded before each model is built and
every builder draws from the RNG in a fixed order: a shared builder here must keep
drawing in the same order with the same config, or every fixture's bytes change.
Nothing here is special-cased at load time: what these build loads through the
ordinary ``from_pretrained`` path like any (very small) real checkpoint.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, DiffusionPipeline, EulerDiscreteScheduler, UNet2DConditionModel
from transformers import (
    CLIPTextConfig,
    CLIPTokenizer,
    PreTrainedModel,
    RobertaTokenizer,
    T5Config,
    T5EncoderModel,
    T5TokenizerFast,
    UMT5Config,
    UMT5EncoderModel,
)

__all__ = [
    "MODEL_MAX_LENGTH",
    "SEED",
    "TinySpec",
    "build_clip_tokenizer",
    "build_t5_tokenizer",
    "bytes_to_unicode",
    "clip_text_config",
    "clip_tokenizer",
    "euler_scheduler",
    "forked_seed",
    "roberta_tokenizer",
    "save_pipeline",
    "sd_unet",
    "sdxl_unet",
    "seeded",
    "t5_encoder",
    "tiny_vae",
    "tokenizer_ids",
    "write_spec",
]

SEED = 0
"""Seed for every model's random weights, so each build is byte-identical."""

MODEL_MAX_LENGTH = 77
"""CLIP's context length; text encoders and tokenizers must agree on it."""

# ---------------------------------------------------------------------------
# Seeding, specs and saving


@contextmanager
def forked_seed(seed: int = SEED) -> Iterator[None]:
    """Seeds torch in a forked RNG: a deterministic build that leaves the caller's RNG untouched."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def seeded(builder: Callable[[], Any]) -> Callable[[], Any]:
    """Runs a builder under SEED in a forked RNG: byte-identical builds whoever calls, the caller's RNG untouched."""

    def build() -> Any:
        with forked_seed(SEED):
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


def write_spec(spec: TinySpec, directory: Path) -> Path:
    """Writes one spec as `build_tiny_models` does (under SEED, caller's RNG untouched), without marker or rename."""
    if spec.write is None:
        raise ValueError("this spec is an entry over another model's directory; it has nothing to write")
    with forked_seed(SEED):
        spec.write(Path(directory))
    return Path(directory)


def save_pipeline(builder: Callable[[], DiffusionPipeline]) -> Callable[[Path], None]:
    """A writer that builds a pipeline and saves it as safetensors, tokenizer files included."""

    def write(directory: Path) -> None:
        pipe = builder()
        pipe.save_pretrained(str(directory), safe_serialization=True)
        _write_bpe_files(pipe, directory)

    return write


def _write_bpe_files(pipe: DiffusionPipeline, directory: Path) -> None:
    """Adds vocab.json/merges.txt beside each saved tokenizer.json, as real checkpoints have, so slow-tokenizer loaders work too."""
    for component, value in pipe.components.items():
        backend = getattr(value, "backend_tokenizer", None)
        folder = directory / component
        if backend is None or not folder.is_dir() or (folder / "vocab.json").exists():
            continue
        backend.model.save(str(folder))


# ---------------------------------------------------------------------------
# Tokenizers (built locally: the real ones need the Hub)

_CLIP_SPECIAL_TOKENS = ("<|startoftext|>", "<|endoftext|>")
_CLIP_MERGES = (
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

# A few byte-level merges so the RoBERTa tokenizer exercises merging, like real vocabularies.
_ROBERTA_MERGES = (
    ("Ġ", "t"),
    ("h", "e"),
    ("Ġt", "he"),
    ("Ġ", "a"),
    ("Ġ", "c"),
    ("a", "t"),
    ("Ġc", "at"),
    ("Ġ", "d"),
    ("o", "g"),
    ("Ġd", "og"),
)

T5_WORDS = ("a", "the", "and", "of", "cat", "dog", "photo", "red", "blue", "in", "on", "with", "sound", "music",
            "rain", "bird", "video")
"""A few whole words, so the Unigram model has something better than single characters to pick."""

T5_CHARS = "abcdefghijklmnopqrstuvwxyz0123456789.,!?'-"
"""Single characters (word-initial and inner); anything else maps to <unk>, which is fine for random weights."""


def bytes_to_unicode() -> dict[int, str]:
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
    byte_chars = list(bytes_to_unicode().values())
    tokens = byte_chars + [c + "</w>" for c in byte_chars] + ["".join(m) for m in _CLIP_MERGES]
    tokens += list(_CLIP_SPECIAL_TOKENS)
    vocab = {tok: i for i, tok in enumerate(dict.fromkeys(tokens))}
    (directory / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    merges = "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in _CLIP_MERGES)
    (directory / "merges.txt").write_text(merges, encoding="utf-8")
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": MODEL_MAX_LENGTH,
        "bos_token": _CLIP_SPECIAL_TOKENS[0],
        "eos_token": _CLIP_SPECIAL_TOKENS[1],
        "unk_token": _CLIP_SPECIAL_TOKENS[1],
        "pad_token": _CLIP_SPECIAL_TOKENS[1],
        "do_lower_case": True,
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    return CLIPTokenizer.from_pretrained(str(directory))


def clip_tokenizer() -> CLIPTokenizer:
    """The tiny CLIP tokenizer, loaded from a throwaway directory (what it saves does not name that directory)."""
    with tempfile.TemporaryDirectory() as tmp:
        return build_clip_tokenizer(Path(tmp))


def build_t5_tokenizer() -> T5TokenizerFast:
    """A tiny T5 tokenizer (Unigram, Metaspace, `</s>` appended, 77 tokens max) for every T5-conditioned family.

    Under transformers 5 ``T5TokenizerFast(vocab=[(piece, score), ...])`` builds exactly that pipeline
    without sentencepiece; ids: <pad>=0, </s>=1, <unk>=2 (T5's fixed special tokens, as in the real vocab).
    """
    pieces: list[tuple[str, float]] = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    pieces += [("\u2581" + w, -3.0) for w in T5_WORDS]  # "▁" marks a word start (Metaspace)
    pieces += [("\u2581" + c, -6.0) for c in T5_CHARS if c not in T5_WORDS]
    pieces += [(c, -5.0) for c in T5_CHARS]
    return T5TokenizerFast(vocab=pieces, extra_ids=0, model_max_length=MODEL_MAX_LENGTH)


def roberta_tokenizer() -> RobertaTokenizer:
    """A byte-level RoBERTa (CLAP) tokenizer with every byte in the vocab, since the real one needs the Hub."""
    byte_chars = list(bytes_to_unicode().values())
    tokens = ["<s>", "<pad>", "</s>", "<unk>", *byte_chars, *("".join(m) for m in _ROBERTA_MERGES), "<mask>"]
    vocab = {tok: i for i, tok in enumerate(dict.fromkeys(tokens))}
    return RobertaTokenizer(vocab=vocab, merges=list(_ROBERTA_MERGES), model_max_length=MODEL_MAX_LENGTH)


def tokenizer_ids(tokenizer: Any) -> dict[str, int]:
    """The tokenizer's special-token ids (those it has), so the text encoder pads and pools where the tokenizer puts them."""
    ids = {
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    return {key: value for key, value in ids.items() if value is not None}


# ---------------------------------------------------------------------------
# Text encoders


def clip_text_config(tokenizer: CLIPTokenizer, **overrides: Any) -> CLIPTextConfig:
    """A 2-layer, 32-wide CLIP text config whose vocab, special ids and context match the local tokenizer."""
    params: dict[str, Any] = {
        "vocab_size": len(tokenizer),
        "hidden_size": 32,
        "intermediate_size": 37,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "max_position_embeddings": MODEL_MAX_LENGTH,
        "hidden_act": "gelu",
        "projection_dim": 32,
        **tokenizer_ids(tokenizer),
    }
    params.update(overrides)
    return CLIPTextConfig(**params)


def t5_encoder(
    tokenizer: T5TokenizerFast, *, width: int, ff_width: int, heads: int, activation: str, umt5: bool = False,
    **config: Any,
) -> PreTrainedModel:
    """A 2-layer T5-style encoder (8-wide heads, 8 position buckets) over the local T5 tokenizer's vocab and ids.

    The families differ in width, heads and feed-forward activation ("relu" = T5 v1.0, "gated-gelu" = v1.1);
    umt5 builds Wan's UMT5EncoderModel instead, and `config` passes any other T5Config field.
    """
    config_class, model_class = (UMT5Config, UMT5EncoderModel) if umt5 else (T5Config, T5EncoderModel)
    params: dict[str, Any] = {
        "vocab_size": len(tokenizer),
        "d_model": width,
        "d_kv": 8,
        "d_ff": ff_width,
        "num_layers": 2,
        "num_heads": heads,
        "relative_attention_num_buckets": 8,
        "feed_forward_proj": activation,
        "decoder_start_token_id": tokenizer.pad_token_id,
        **tokenizer_ids(tokenizer),
        **config,
    }
    return model_class(config_class(**params))


# ---------------------------------------------------------------------------
# UNets, VAE, scheduler


def sd_unet(**overrides: Any) -> UNet2DConditionModel:
    """The tiny SD-style UNet (two levels, 32/64 wide, 8x8 latents = 64x64 pixels); overrides give SDXL, LCM, ..."""
    params: dict[str, Any] = {
        "sample_size": 8,
        "in_channels": 4,
        "out_channels": 4,
        "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
        "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"),
        "block_out_channels": (32, 64),
        "layers_per_block": 1,
        "cross_attention_dim": 32,
        "attention_head_dim": 8,
        "norm_num_groups": 32,
        **overrides,
    }
    return UNet2DConditionModel(**params)


def sdxl_unet(projection_input_dim: int, cross_attention_dim: int, addition_time_embed_dim: int = 8) -> UNet2DConditionModel:
    """The tiny SDXL-style UNet shared by the base and the refiner; they differ only in their conditioning widths."""
    return sd_unet(
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        transformer_layers_per_block=(1, 2),
        addition_embed_type="text_time",
        addition_time_embed_dim=addition_time_embed_dim,
        projection_class_embeddings_input_dim=projection_input_dim,
        cross_attention_dim=cross_attention_dim,
    )


def tiny_vae(channels: int = 3) -> AutoencoderKL:
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


def euler_scheduler() -> EulerDiscreteScheduler:
    """SD's standard noise schedule; Euler works with any step count, which tests need (2 steps)."""
    return EulerDiscreteScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        timestep_spacing="leading",
        steps_offset=1,
    )
