"""Tiny random-weight cascades and few-step families, built fully offline.

Companion to :mod:`pipelines.tiny.sd`: the same conventions (deterministic random
weights, safetensors, loads through plain ``DiffusionPipeline.from_pretrained``),
for the pipeline families whose call shape differs from plain text-to-image:

``tiny-sdxl-refiner``
    ``StableDiffusionXLImg2ImgPipeline`` built like the SDXL refiner: only the
    second text encoder, aesthetic-score conditioning.  It shares tiny-sdxl's
    VAE and ``text_encoder_2``/``tokenizer_2`` weights byte for byte (as the real
    refiner shares the base's VAE and OpenCLIP encoder), so base latents hand
    over directly.
``tiny-sdxl-refined``
    A catalog entry over tiny-sdxl's directory with ``stages: [tiny-sdxl-refiner]``.
    Handoff: ``base(prompt, ..., denoising_end=f, output_type="latent").images``
    -> ``refiner(prompt, image=<those latents>, denoising_start=f, ...)``.
``tiny-cm``
    ``ConsistencyModelPipeline``: class-conditional pixel-space ``UNet2DModel``
    (10 classes, 32x32) with ``CMStochasticIterativeScheduler``; takes
    ``batch_size`` and ``class_labels``, no prompt.
``tiny-lcm``
    ``LatentConsistencyModelPipeline``: SD-style UNet with ``time_cond_proj_dim``
    (the guidance-scale ``w`` embedding), ``LCMScheduler``, 1-4 steps, no CFG.
``tiny-if`` / ``tiny-if-2``
    DeepFloyd IF stage I (``IFPipeline``, 32x32 pixels) and stage II
    (``IFSuperResolutionPipeline``, 32 -> 128, 4x like the real 64 -> 256).
    Stage II shares stage I's T5 tokenizer and encoder byte for byte.
    Handoff: ``stage1(prompt, ..., output_type="pt").images`` (a float tensor in
    about [-1, 1]) -> ``stage2(prompt, image=<that tensor>, ...)``.

Every builder draws from torch's global RNG, which the caller seeds
(``build_tiny_models`` seeds ``SEED`` before each writer, see ``write_spec``); components
shared with another tiny model are rebuilt under their own ``SEED`` fork so they
match that model exactly whatever the caller's RNG state.
"""

from __future__ import annotations

from typing import Any

from diffusers import (
    CMStochasticIterativeScheduler,
    ConsistencyModelPipeline,
    DDPMScheduler,
    IFPipeline,
    IFSuperResolutionPipeline,
    LatentConsistencyModelPipeline,
    LCMScheduler,
    StableDiffusionXLImg2ImgPipeline,
    UNet2DConditionModel,
    UNet2DModel,
)
from transformers import CLIPTextModel, PreTrainedModel, T5TokenizerFast

from pipelines.tiny.common import (
    SEED,
    TinySpec,
    build_t5_tokenizer,
    clip_text_config,
    clip_tokenizer,
    euler_scheduler,
    forked_seed,
    save_pipeline,
    sd_unet,
    sdxl_unet,
    t5_encoder,
    tiny_vae,
)
from pipelines.tiny.sd import IMAGE_DEFAULTS, build_tiny_sdxl

__all__ = [
    "CASCADE_MODELS",
    "CM_NUM_CLASSES",
    "IF_STAGE1_SIZE",
    "IF_STAGE2_SIZE",
    "build_tiny_cm",
    "build_tiny_if",
    "build_tiny_if_2",
    "build_tiny_lcm",
    "build_tiny_sdxl_refiner",
]

CM_NUM_CLASSES = 10
"""Class labels tiny-cm accepts: 0 .. CM_NUM_CLASSES - 1."""

CM_SIZE = 32
"""tiny-cm renders CM_SIZE x CM_SIZE pixels (pixel space, no VAE; fixed by the UNet)."""

IF_STAGE1_SIZE = 32
"""tiny-if (stage I) renders this many pixels square by default (the real IF-I: 64)."""

IF_STAGE2_SIZE = 128
"""tiny-if-2 (stage II) upsamples to this by default, 4x like the real IF-II (64 -> 256)."""

_T5_WIDTH = 32
"""d_model of the tiny T5 encoder; IF UNets take it as encoder_hid_dim."""

# ---------------------------------------------------------------------------
# SDXL refiner


def build_tiny_sdxl_refiner() -> StableDiffusionXLImg2ImgPipeline:
    """Tiny SDXL refiner: text_encoder_2 only, aesthetic-score time ids, tiny-sdxl's VAE and encoder 2."""
    with forked_seed(SEED):
        # Rebuild tiny-sdxl exactly as its own writer does, to share its VAE and second text encoder.
        base = build_tiny_sdxl()
    text_encoder_2 = base.text_encoder_2
    addition_time_embed_dim = 8
    # 5 time ids (original h,w; crop top,left; aesthetic score), each embedded, plus the pooled text embedding.
    projection_input_dim = 5 * addition_time_embed_dim + text_encoder_2.config.projection_dim
    # The refiner sees only encoder 2's states.
    unet = sdxl_unet(projection_input_dim, text_encoder_2.config.hidden_size, addition_time_embed_dim)
    return StableDiffusionXLImg2ImgPipeline(
        vae=base.vae,
        text_encoder=None,
        text_encoder_2=text_encoder_2,
        tokenizer=None,
        tokenizer_2=base.tokenizer_2,
        unet=unet,
        scheduler=euler_scheduler(),
        image_encoder=None,
        feature_extractor=None,
        requires_aesthetics_score=True,
        force_zeros_for_empty_prompt=True,
    )


# ---------------------------------------------------------------------------
# Consistency model (class-conditional, pixel space)


def build_tiny_cm() -> ConsistencyModelPipeline:
    """Tiny class-conditional consistency model: a 32x32 pixel UNet2DModel with 10 class embeddings."""
    unet = UNet2DModel(
        sample_size=CM_SIZE,
        in_channels=3,
        out_channels=3,
        down_block_types=("ResnetDownsampleBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "ResnetUpsampleBlock2D"),
        block_out_channels=(16, 32),
        layers_per_block=1,
        attention_head_dim=8,
        norm_num_groups=8,
        resnet_time_scale_shift="scale_shift",
        num_class_embeds=CM_NUM_CLASSES,
    )
    # The openai/diffusers-cd_imagenet64 schedule.
    scheduler = CMStochasticIterativeScheduler(num_train_timesteps=40, sigma_min=0.002, sigma_max=80.0)
    return ConsistencyModelPipeline(unet=unet, scheduler=scheduler)


# ---------------------------------------------------------------------------
# Latent consistency model (text-conditioned, few steps)


def build_tiny_lcm() -> LatentConsistencyModelPipeline:
    """Tiny LCM: an SD-style UNet with a guidance-scale embedding (time_cond_proj_dim) and LCMScheduler."""
    unet = sd_unet(time_cond_proj_dim=32)  # LCM embeds w = guidance_scale - 1 and adds it to the time embedding
    vae = tiny_vae()
    tokenizer = clip_tokenizer()
    text_encoder = CLIPTextModel(clip_text_config(tokenizer))
    # SimianLuo/LCM_Dreamshaper_v7's scheduler config.
    scheduler = LCMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        original_inference_steps=50,
        clip_sample=False,
        set_alpha_to_one=True,
        steps_offset=1,
        prediction_type="epsilon",
        timestep_spacing="leading",
        timestep_scaling=10.0,
    )
    return LatentConsistencyModelPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        image_encoder=None,
        requires_safety_checker=False,
    )


# ---------------------------------------------------------------------------
# DeepFloyd IF (pixel cascade with a T5 encoder)


def _if_t5_encoder(tokenizer: T5TokenizerFast) -> PreTrainedModel:
    """A 32-wide T5 v1.1-style encoder (gated GELU, 4 heads, no dropout) like IF's T5-XXL, only tiny."""
    return t5_encoder(
        tokenizer, width=_T5_WIDTH, ff_width=37, heads=4, activation="gated-gelu",
        relative_attention_max_distance=32, dropout_rate=0.0,
    )


def _if_unet(stage: int) -> UNet2DConditionModel:
    """IF-style UNet: text added to the time embedding, simple (added-KV) cross attention at the lowest level only.

    Stage I: 3 input channels, 6 outputs (epsilon + learned variance range), 32x32 -> attention at 16x16.
    Stage II: 6 inputs (noisy image + upscaled stage-I image), noise level via class_embed_type="timestep";
    four levels so attention runs at 16x16 when it renders 128x128 (at 32x32 it is ~2x slower).
    """
    common: dict[str, Any] = {
        "layers_per_block": 1,
        "mid_block_type": "UNetMidBlock2DSimpleCrossAttn",
        "out_channels": 6,
        "cross_attention_dim": _T5_WIDTH,
        "encoder_hid_dim": _T5_WIDTH,
        "attention_head_dim": 8,
        "addition_embed_type": "text",
        "addition_embed_type_num_heads": 2,
        "cross_attention_norm": "group_norm",
        "resnet_time_scale_shift": "scale_shift",
        "act_fn": "gelu",
        "norm_num_groups": 8,
    }
    if stage == 1:
        return UNet2DConditionModel(
            sample_size=IF_STAGE1_SIZE,
            in_channels=3,
            down_block_types=("ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"),
            up_block_types=("SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"),
            block_out_channels=(16, 32),
            **common,
        )
    return UNet2DConditionModel(
        sample_size=IF_STAGE2_SIZE,
        in_channels=6,
        down_block_types=("ResnetDownsampleBlock2D",) * 3 + ("SimpleCrossAttnDownBlock2D",),
        up_block_types=("SimpleCrossAttnUpBlock2D",) + ("ResnetUpsampleBlock2D",) * 3,
        block_out_channels=(8, 16, 32, 32),
        class_embed_type="timestep",
        mid_block_scale_factor=1.414,
        time_embedding_act_fn="gelu",
        time_embedding_dim=32,
        **common,
    )


def _if_scheduler() -> DDPMScheduler:
    """IF's denoising schedule (cosine, learned variance range, dynamic thresholding)."""
    return DDPMScheduler(
        num_train_timesteps=1000,
        beta_schedule="squaredcos_cap_v2",
        beta_start=0.0001,
        beta_end=0.02,
        thresholding=True,
        dynamic_thresholding_ratio=0.95,
        sample_max_value=1.0,
        prediction_type="epsilon",
        variance_type="learned_range",
        clip_sample=True,
        clip_sample_range=1.0,
    )


def build_tiny_if() -> IFPipeline:
    """Tiny DeepFloyd IF stage I: T5 text encoder + 32x32 pixel UNet; no watermarker or safety checker."""
    tokenizer = build_t5_tokenizer()
    text_encoder = _if_t5_encoder(tokenizer)
    unet = _if_unet(1)
    return IFPipeline(
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        unet=unet,
        scheduler=_if_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        watermarker=None,
        requires_safety_checker=False,
    )


def build_tiny_if_2() -> IFSuperResolutionPipeline:
    """Tiny DeepFloyd IF stage II: upsamples to 128x128, conditioned on stage I's T5 (shared weights)."""
    with forked_seed(SEED):
        # Rebuild stage I exactly as its own writer does, to share its tokenizer and T5 encoder.
        stage1 = build_tiny_if()
    unet = _if_unet(2)
    image_noising_scheduler = DDPMScheduler(
        num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", beta_start=0.0001, beta_end=0.02
    )
    scheduler = DDPMScheduler(
        num_train_timesteps=1000,
        beta_schedule="squaredcos_cap_v2",
        beta_start=0.0001,
        beta_end=0.02,
        thresholding=False,
        prediction_type="epsilon",
        variance_type="learned_range",
        clip_sample=True,
        clip_sample_range=1.0,
    )
    return IFSuperResolutionPipeline(
        tokenizer=stage1.tokenizer,
        text_encoder=stage1.text_encoder,
        unet=unet,
        scheduler=scheduler,
        image_noising_scheduler=image_noising_scheduler,
        safety_checker=None,
        feature_extractor=None,
        watermarker=None,
        requires_safety_checker=False,
    )


# ---------------------------------------------------------------------------
# Catalog specs

CASCADE_MODELS: dict[str, TinySpec] = {
    "tiny-sdxl-refiner": TinySpec(
        save_pipeline(build_tiny_sdxl_refiner),
        {
            "kind": "pipeline",
            "tasks": ["edit"],
            # As an edit model: strength applies to a pixel image.  As a cascade stage it gets the
            # base's latents and denoising_start, which overrides strength.
            "defaults": {"num_inference_steps": 4, "guidance_scale": 5.0, "strength": 0.3},
        },
    ),
    "tiny-sdxl-refined": TinySpec(
        None,
        {
            "source": "tiny-sdxl",
            "kind": "pipeline",
            "tasks": ["image"],
            "stages": ["tiny-sdxl-refiner"],
            # denoising_end is the base's; the refiner stage gets denoising_start equal to it.
            "defaults": {**IMAGE_DEFAULTS, "denoising_end": 0.5},
        },
    ),
    "tiny-cm": TinySpec(
        save_pipeline(build_tiny_cm),
        {"kind": "pipeline", "tasks": ["image"], "defaults": {"num_inference_steps": 1}},
    ),
    "tiny-lcm": TinySpec(
        save_pipeline(build_tiny_lcm),
        {
            "kind": "pipeline",
            "tasks": ["image"],
            # LCM does no CFG: guidance_scale only feeds the w embedding (w = guidance_scale - 1).
            "defaults": {"num_inference_steps": 2, "guidance_scale": 8.0, "width": 64, "height": 64},
        },
    ),
    "tiny-if": TinySpec(
        save_pipeline(build_tiny_if),
        {
            "kind": "pipeline",
            "tasks": ["image"],
            "stages": ["tiny-if-2"],
            # clean_caption needs bs4 + ftfy (not installed); without them IF warns and skips it.
            "defaults": {
                "num_inference_steps": 2,
                "guidance_scale": 7.0,
                "width": IF_STAGE1_SIZE,
                "height": IF_STAGE1_SIZE,
                "clean_caption": False,
            },
        },
    ),
    "tiny-if-2": TinySpec(
        save_pipeline(build_tiny_if_2),
        {
            "kind": "pipeline",
            "tasks": ["edit"],
            # Output size defaults to the UNet's sample_size (128); the input image is resized to it.
            "defaults": {"num_inference_steps": 2, "guidance_scale": 4.0, "noise_level": 250, "clean_caption": False},
        },
    ),
}
"""Name -> spec; specs with write=None are entries over another model's directory (their `source`)."""
