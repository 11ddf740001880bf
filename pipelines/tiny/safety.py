"""The tiny random-weight safety checker, built fully offline, for tests and the tiny catalog.

A ``StableDiffusionSafetyChecker`` over a 2-layer, 32-wide CLIP vision tower (32x32 input,
8x8 patches) with a ``CLIPImageProcessor`` resizing and cropping to 32, saved with safetensors in
the Hub checker's layout (``config.json``, ``model.safetensors``, ``preprocessor_config.json``),
so it loads through the same path as ``CompVis/stable-diffusion-safety-checker``.

Random concept embeddings with realistic thresholds would flag an arbitrary subset of images, so
the saved thresholds decide instead (`set_checker_mode`): the checker flags a concept when
``cosine(image, concept) - threshold > 0``, and cosines lie in [-1, 1], so a threshold of 2
flags nothing (``pass_all``, the default, so ordinary tiny renders are never filtered) and -2
flags everything (``flag_all``). Nothing is special-cased at load time.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
from safetensors.torch import load_file, save_file
from transformers import CLIPConfig

from pipelines.loading import quiet_hf_progress
from pipelines.safety import checker_dirs, processor_class
from pipelines.tiny.common import SEED, TinySpec, forked_seed

__all__ = [
    "IMAGE_SIZE",
    "MODES",
    "SAFETY_MODELS",
    "build_tiny_safety_checker",
    "set_checker_mode",
    "write_tiny_safety_checker",
]

IMAGE_SIZE = 32
"""The tiny checker's input size (resize shortest edge, then center crop)."""

MODES = {"pass_all": 2.0, "flag_all": -2.0}
"""Mode -> the threshold written into every concept and special-care weight."""

_THRESHOLD_KEYS = ("concept_embeds_weights", "special_care_embeds_weights")


def build_tiny_safety_checker() -> tuple[StableDiffusionSafetyChecker, Any]:
    """(checker, image processor) with random weights; seed torch first for identical builds."""
    width = 32
    config = CLIPConfig(
        # The checker never builds the text tower, but CLIPConfig needs one; keep it tiny and consistent.
        text_config={
            "vocab_size": 64,
            "hidden_size": width,
            "intermediate_size": 37,
            "num_hidden_layers": 1,
            "num_attention_heads": 4,
            "max_position_embeddings": 77,
            "bos_token_id": 0,
            "eos_token_id": 1,
            "pad_token_id": 1,
        },
        vision_config={
            "hidden_size": width,
            "intermediate_size": 37,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "image_size": IMAGE_SIZE,
            "patch_size": 8,
        },
        projection_dim=width,
    )
    checker = StableDiffusionSafetyChecker(config)
    with torch.no_grad():
        # Random concept directions (the class starts them at all-ones), thresholds per the default mode.
        checker.concept_embeds.copy_(torch.randn_like(checker.concept_embeds))
        checker.special_care_embeds.copy_(torch.randn_like(checker.special_care_embeds))
        checker.concept_embeds_weights.fill_(MODES["pass_all"])
        checker.special_care_embeds_weights.fill_(MODES["pass_all"])
    processor = processor_class()(
        size={"shortest_edge": IMAGE_SIZE},
        crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
    )
    return checker, processor


def write_tiny_safety_checker(directory: str | Path) -> None:
    """Builds the tiny checker deterministically (own seed, caller's RNG untouched) and saves it in the Hub layout."""
    quiet_hf_progress()
    directory = Path(directory)
    with forked_seed(SEED):
        checker, processor = build_tiny_safety_checker()
    checker.save_pretrained(str(directory), safe_serialization=True)
    processor.save_pretrained(str(directory))


def set_checker_mode(checker_dir: str | Path, mode: str) -> None:
    """Rewrites a saved checker's thresholds so it flags every image ("flag_all") or none ("pass_all")."""
    if mode not in MODES:
        raise ValueError(f"unknown checker mode {mode!r}; known: {sorted(MODES)}")
    model_dir, _ = checker_dirs(checker_dir)
    weights = model_dir / "model.safetensors"
    if not weights.is_file():
        raise FileNotFoundError(f"{weights} not found (set_checker_mode handles single-file checkpoints only)")
    tensors = load_file(str(weights))
    missing = [k for k in _THRESHOLD_KEYS if k not in tensors]
    if missing:
        raise KeyError(f"{weights} has no {missing}: not a StableDiffusionSafetyChecker checkpoint")
    for key in _THRESHOLD_KEYS:
        tensors[key] = torch.full_like(tensors[key], MODES[mode])
    tmp = weights.with_name(f".{weights.name}.tmp")
    save_file(tensors, str(tmp), metadata={"format": "pt"})
    tmp.replace(weights)


SAFETY_MODELS: dict[str, TinySpec] = {
    "tiny-safety-checker": TinySpec(write_tiny_safety_checker, {"kind": "safety_checker"}),
}
"""Name -> spec for the tiny safety checker; the name is also its directory and catalog key."""
