"""Tiny random-weight text-to-video pipelines, built fully offline.

The video counterpart of :mod:`pipelines.tiny.sd`: each spec writes a small,
deterministic, random-weight pipeline with ``save_pretrained(...,
safe_serialization=True)`` so that ``DiffusionPipeline.from_pretrained(dir)``
loads it like a real checkpoint (no special-casing at load time).

Families, and the call differences a renderer has to know (measured with
diffusers 0.42.1):

* ``tiny-t2v``: ``TextToVideoSDPipeline`` (ModelScope/VideoFusion, zeroscope).
  ``num_frames`` is free; width/height multiples of 8.  ``.frames`` is
  ``(batch, F, H, W, 3)`` float32 in [0, 1] for ``output_type="np"``.
  Deprecated in diffusers (frozen at 0.33.1) but loads and renders.
* ``tiny-t2v-zero``: ``TextToVideoZeroPipeline`` built with ``from_pipe`` over
  an SD checkpoint.  The frame count is ``video_length`` (not
  ``num_frames``); ``t0 < t1 <= num_inference_steps - 1`` (defaults 44/47 need
  >= 48 steps); ONE prompt per call (two prompts fail with an IndexError in
  its motion warp) and a single generator; the output is ``.images`` (not
  ``.frames``), always a ``(F, H, W, 3)`` float32 array in [0, 1] whatever
  ``output_type`` says.  Its forward-noising step slices
  ``scheduler.alphas[t0:t1]`` by timestep value, so it needs a scheduler with
  integer timesteps (DDIM, DPM-Solver++, UniPC; PNDM only with ~10+ steps):
  with SD's Euler/LMS schedulers it fails with "slice indices must be
  integers".  tiny-sd uses Euler, so this entry is tiny-sd's exact weights
  saved with a DDIM scheduler in its own directory.
* ``tiny-wan``: ``WanPipeline`` (Wan 2.1 layout: UMT5 text encoder, causal 3D
  VAE, ``WanTransformer3DModel``, flow-matching UniPC).  ``num_frames`` must be
  ``4k + 1`` (others are rounded to ``(n // 4) * 4 + 1`` with a warning, so
  8 becomes 9); height/width must be multiples of 16 (8x VAE x 2x2 patches).
  ``.frames`` is ``(batch, F, H, W, 3)`` float32 in [0, 1].  Prompts are
  padded to ``max_sequence_length`` (default 512, not the tokenizer's
  ``model_max_length``).

``fps`` in the defaults is an output (encoding) setting, not a call argument;
``t0``/``t1``/``max_sequence_length`` are call arguments only their family
accepts, so renderers pass a default only where ``__call__`` takes it.
"""

from __future__ import annotations

from typing import Any

from diffusers import (
    AutoencoderKLWan,
    DDIMScheduler,
    StableDiffusionPipeline,
    TextToVideoSDPipeline,
    UNet3DConditionModel,
    UniPCMultistepScheduler,
    WanPipeline,
    WanTransformer3DModel,
)
from transformers import CLIPTextModel

from pipelines.tiny.common import (
    MODEL_MAX_LENGTH,
    TinySpec,
    build_t5_tokenizer,
    clip_text_config,
    clip_tokenizer,
    save_pipeline,
    t5_encoder,
    tiny_vae,
)
from pipelines.tiny.sd import build_tiny_sd

__all__ = [
    "VIDEO_MODELS",
    "build_tiny_t2v",
    "build_tiny_t2v_zero_base",
    "build_tiny_wan",
]


def _ddim_scheduler() -> DDIMScheduler:
    """SD's noise schedule under DDIM: integer timesteps (Text2Video-Zero needs them) and any step count."""
    return DDIMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        timestep_spacing="leading",
    )


def build_tiny_t2v() -> TextToVideoSDPipeline:
    """Tiny TextToVideoSDPipeline (UNet3D + SD's 4-block VAE + CLIP), 64x64 by default."""
    unet = UNet3DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock3D", "DownBlock3D"),
        up_block_types=("UpBlock3D", "CrossAttnUpBlock3D"),
        block_out_channels=(16, 32),
        layers_per_block=1,
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=8,
    )
    tokenizer = clip_tokenizer()
    text_encoder = CLIPTextModel(clip_text_config(tokenizer))
    return TextToVideoSDPipeline(
        vae=tiny_vae(), text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=_ddim_scheduler()
    )


def build_tiny_t2v_zero_base() -> StableDiffusionPipeline:
    """tiny-sd's weights (same seed, same builder) with a DDIM scheduler, the base Text2Video-Zero is built on."""
    pipe = build_tiny_sd()
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, clip_sample=False, set_alpha_to_one=False)
    return pipe


def build_tiny_wan() -> WanPipeline:
    """Tiny WanPipeline (Wan 2.1 layout): UMT5 encoder, causal 3D VAE, 2-layer transformer, flow-matching UniPC."""
    tokenizer = build_t5_tokenizer()
    text_dim = 32
    text_encoder = t5_encoder(tokenizer, width=text_dim, ff_width=64, heads=4, activation="gated-gelu", umt5=True)
    # z_dim stays 16: the pipeline de-normalises latents with the config's 16-entry latents_mean/std.
    vae = AutoencoderKLWan(
        base_dim=4, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True]
    )
    transformer = WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=16,
        in_channels=16,
        out_channels=16,
        text_dim=text_dim,
        freq_dim=32,
        ffn_dim=64,
        num_layers=2,
        rope_max_seq_len=32,
    )
    # The scheduler Wan 2.1's Diffusers checkpoints ship with (flow_shift 3.0 is their 480p setting).
    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)
    return WanPipeline(
        tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer, scheduler=scheduler
    )


def video_entry(defaults: dict[str, Any], **extra: Any) -> dict[str, Any]:
    """A text-to-video catalog entry (without `source`)."""
    return {"kind": "pipeline", **extra, "tasks": ["video"], "defaults": dict(defaults)}


VIDEO_MODELS: dict[str, TinySpec] = {
    "tiny-t2v": TinySpec(
        save_pipeline(build_tiny_t2v),
        video_entry(
            {"num_inference_steps": 2, "guidance_scale": 5.0, "width": 64, "height": 64, "num_frames": 8, "fps": 8}
        ),
    ),
    # Renderers pass num_frames as `video_length` here; t0 < t1 <= num_inference_steps - 1.
    "tiny-t2v-zero": TinySpec(
        save_pipeline(build_tiny_t2v_zero_base),
        video_entry(
            {
                "num_inference_steps": 2,
                "guidance_scale": 5.0,
                "width": 64,
                "height": 64,
                "num_frames": 4,
                "fps": 4,
                "t0": 0,
                "t1": 1,
            },
            pipeline_class="TextToVideoZeroPipeline",
        ),
    ),
    # max_sequence_length: Wan pads prompts to 512 tokens by default, which is half the tiny model's render time.
    "tiny-wan": TinySpec(
        save_pipeline(build_tiny_wan),
        video_entry(
            {
                "num_inference_steps": 2,
                "guidance_scale": 5.0,
                "width": 64,
                "height": 64,
                "num_frames": 9,
                "fps": 8,
                "max_sequence_length": MODEL_MAX_LENGTH,
            }
        ),
    ),
}
"""Name -> spec for each tiny video model; the name is also its directory and catalog key."""
