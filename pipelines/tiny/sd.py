"""Tiny Stable Diffusion and SDXL text-to-image pipelines: the base models most other families build on.

``tiny-sd`` is the ``StableDiffusionPipeline`` (64x64 by default) whose weights the
edit, ControlNet, LoRA and Text2Video-Zero models reuse byte for byte; ``tiny-sdxl``
is the ``StableDiffusionXLPipeline`` (two text encoders, text_time conditioning)
that the refiner and the SDXL ControlNets pair with.
"""

from __future__ import annotations

from typing import Any

from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
from transformers import CLIPTextModel, CLIPTextModelWithProjection

from pipelines.tiny.common import (
    TinySpec,
    clip_text_config,
    clip_tokenizer,
    euler_scheduler,
    save_pipeline,
    sd_unet,
    sdxl_unet,
    tiny_vae,
)

__all__ = ["IMAGE_DEFAULTS", "SD_MODELS", "build_tiny_sd", "build_tiny_sdxl", "image_entry"]

IMAGE_DEFAULTS: dict[str, Any] = {
    "num_inference_steps": 4,
    "guidance_scale": 5.0,
    "width": 64,
    "height": 64,
}
"""Call defaults of the tiny text-to-image entries: a few steps at the UNets' native 64x64."""


def build_tiny_sd() -> StableDiffusionPipeline:
    """Tiny StableDiffusionPipeline (64x64 default) for fast, offline SD-path tests."""
    unet = sd_unet()
    vae = tiny_vae()
    tokenizer = clip_tokenizer()
    text_encoder = CLIPTextModel(clip_text_config(tokenizer))
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=euler_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        image_encoder=None,
        requires_safety_checker=False,
    )


def build_tiny_sdxl() -> StableDiffusionXLPipeline:
    """Tiny StableDiffusionXLPipeline (two text encoders, text_time conditioning) for the SDXL path."""
    tokenizer = clip_tokenizer()
    tokenizer_2 = clip_tokenizer()
    te1_config = clip_text_config(tokenizer)
    te2_config = clip_text_config(tokenizer_2)
    text_encoder = CLIPTextModel(te1_config)
    text_encoder_2 = CLIPTextModelWithProjection(te2_config)
    addition_time_embed_dim = 8
    # 6 size/crop ids (original h,w; crop top,left; target h,w), each embedded, plus the pooled text embedding.
    projection_input_dim = 6 * addition_time_embed_dim + te2_config.projection_dim
    unet = sdxl_unet(projection_input_dim, te1_config.hidden_size + te2_config.hidden_size, addition_time_embed_dim)
    vae = tiny_vae()
    return StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=unet,
        scheduler=euler_scheduler(),
        image_encoder=None,
        feature_extractor=None,
        force_zeros_for_empty_prompt=True,
    )


def image_entry(**extra: Any) -> dict[str, Any]:
    """A text-to-image catalog entry with the tiny defaults."""
    return {"kind": "pipeline", "tasks": ["image"], "defaults": dict(IMAGE_DEFAULTS), **extra}


SD_MODELS: dict[str, TinySpec] = {
    "tiny-sd": TinySpec(save_pipeline(build_tiny_sd), image_entry()),
    "tiny-sdxl": TinySpec(save_pipeline(build_tiny_sdxl), image_entry()),
}
"""Name -> spec for the SD and SDXL base models; the name is also its directory and catalog key."""
