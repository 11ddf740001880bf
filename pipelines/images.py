"""Text-to-image: one pipeline call for a group of rows that share their call parameters."""

from __future__ import annotations

import inspect
from typing import Any

import torch
from diffusers import DiffusionPipeline
from PIL import Image


def call_parameters(pipe: DiffusionPipeline) -> set[str]:
    """Names the pipeline's __call__ accepts, so one adapter serves many families."""
    return set(inspect.signature(pipe.__call__).parameters)


def generators(seeds: list[int]) -> list[torch.Generator]:
    """One CPU generator per row: results match across devices and batch compositions."""
    return [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]


def generate_images(
    pipe: DiffusionPipeline,
    prompts: list[str],
    negative_prompts: list[str | None],
    seeds: list[int],
    *,
    num_inference_steps: int | None = None,
    guidance_scale: float | None = None,
    width: int | None = None,
    height: int | None = None,
) -> list[Image.Image]:
    accepted = call_parameters(pipe)
    kwargs: dict[str, Any] = {
        "prompt": list(prompts),
        "generator": generators(seeds),
        "output_type": "pil",
    }
    if any(n is not None for n in negative_prompts) and "negative_prompt" in accepted:
        kwargs["negative_prompt"] = [n or "" for n in negative_prompts]
    for name, value in (
        ("num_inference_steps", num_inference_steps),
        ("guidance_scale", guidance_scale),
        ("width", width),
        ("height", height),
    ):
        if value is not None and name in accepted:
            kwargs[name] = value
    with torch.inference_mode():
        images = pipe(**kwargs).images
    if len(images) != len(prompts):
        raise RuntimeError(f"pipeline returned {len(images)} images for {len(prompts)} prompts")
    return images
