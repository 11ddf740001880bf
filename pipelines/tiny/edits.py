"""Tiny edit, ControlNet, LoRA and textual-inversion models for offline tests.

Companions to :mod:`pipelines.tiny.sd`: every spec here either writes its own
small, deterministic, random-weight model (safetensors only) or, with
``write=None``, names another tiny model's directory as its ``source`` and
builds a different diffusers pipeline over the same components through
``pipeline_class`` (``from_pipe``).

- Edit pipelines: img2img and 4-channel inpaint over ``tiny-sd`` itself;
  a 9-channel inpaint UNet and an 8-channel InstructPix2Pix UNet in their own
  directories (VAE, text encoder and tokenizer identical to ``tiny-sd``'s).
- ControlNets matching tiny-sd's and tiny-sdxl's UNets, loaded with
  ``ControlNetModel.from_pretrained(dir)`` and handed to ``pipeline_class``
  through ``from_pipe(base, controlnet=...)``; their zero-initialised output
  convolutions are re-randomised so a control image actually changes the output.
- LoRAs for tiny-sd's UNet, saved with ``StableDiffusionPipeline.save_lora_weights``
  and loaded with ``pipe.load_lora_weights(dir, adapter_name=...)``.
- A textual-inversion embedding for tiny-sd's text encoder, loaded with
  ``pipe.load_textual_inversion(dir, token=...)``.

Every writer seeds torch itself (inside ``fork_rng``, so the caller's RNG is
untouched): a build is byte-identical whoever calls it.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from diffusers import (
    ControlNetModel,
    DiffusionPipeline,
    StableDiffusionInpaintPipeline,
    StableDiffusionInstructPix2PixPipeline,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from safetensors.torch import save_file

from pipelines.tiny.common import SEED, TinySpec, forked_seed, save_pipeline
from pipelines.tiny.sd import build_tiny_sd, build_tiny_sdxl, image_entry

__all__ = [
    "EDIT_MODELS",
    "EMBEDDING_FILE",
    "EMBEDDING_TOKEN",
    "LORA_FILE",
    "LORA_TARGET_MODULES",
    "build_tiny_controlnet",
    "build_tiny_pix2pix",
    "build_tiny_sd_inpaint_9ch",
]

LORA_FILE = "pytorch_lora_weights.safetensors"
"""The file `save_lora_weights` writes and `load_lora_weights(dir)` looks for."""

LORA_TARGET_MODULES = ("to_q", "to_k", "to_v", "to_out.0")
"""Attention projections the tiny LoRAs adapt (the usual SD LoRA targets)."""

EMBEDDING_FILE = "learned_embeds.safetensors"
"""The file `load_textual_inversion(dir)` looks for."""

EMBEDDING_TOKEN = "<tiny-style>"
"""The prompt token the tiny textual-inversion embedding defines."""

_CONDITIONING_CHANNELS = (8, 8, 16, 16)
"""ControlNet hint encoder widths: 4 entries = 3 stride-2 convs = the VAE's 8x downscale."""

_HINT_GAIN = 8.0
"""Scales the hint encoder's last conv: its output std goes from ~0.07 to ~0.5, conv_in's own scale."""

_MASKED_IMAGE_GAIN = 16.0
"""Scales the 9-channel inpaint UNet's conv_in weights on the masked-image latents (see its builder)."""

_EDIT_DEFAULTS: dict[str, Any] = {"num_inference_steps": 4, "guidance_scale": 5.0}
"""No width/height: img2img and pix2pix silently ignore them (their output takes the input image's size)."""


def _unet_with_in_channels(unet: UNet2DConditionModel, in_channels: int) -> UNet2DConditionModel:
    """A fresh random UNet with `unet`'s config except its input channels."""
    return UNet2DConditionModel.from_config({**unet.config, "in_channels": in_channels})


def build_tiny_sd_inpaint_9ch() -> StableDiffusionInpaintPipeline:
    """Tiny SD inpainting with a 9-channel UNet (4 latent + 1 mask + 4 masked-image latent channels).

    Built under SEED, so VAE, text encoder and tokenizer equal tiny-sd's; only the UNet is new.
    The pipeline feeds the masked image as VAE latents times the scaling factor (~0.03 apart for
    two different images, against ~1 for the noise), so with plain random weights the input image
    hardly mattered (outputs 1/255 apart); conv_in's masked-image weights are scaled up to fix that.
    """
    with forked_seed(SEED):
        sd = build_tiny_sd()
        unet = _unet_with_in_channels(sd.unet, 9)
    with torch.no_grad():
        unet.conv_in.weight[:, 5:].mul_(_MASKED_IMAGE_GAIN)  # channels: 4 noisy latents, 1 mask, 4 masked image
    return StableDiffusionInpaintPipeline(**{**sd.components, "unet": unet}, requires_safety_checker=False)


def build_tiny_pix2pix() -> StableDiffusionInstructPix2PixPipeline:
    """Tiny InstructPix2Pix with an 8-channel UNet (4 latent + 4 input-image latent channels)."""
    with forked_seed(SEED):
        sd = build_tiny_sd()
        unet = _unet_with_in_channels(sd.unet, 8)
    components = {**sd.components, "unet": unet}
    return StableDiffusionInstructPix2PixPipeline(**components, requires_safety_checker=False)


def build_tiny_controlnet(base: Callable[[], DiffusionPipeline], seed: int) -> ControlNetModel:
    """A ControlNet shaped like `base()`'s UNet, initialised from its weights as ControlNet training does.

    diffusers starts the output ("zero") convolutions and the hint encoder's last conv at zero,
    which would make every control image a no-op, and default-initialised hint convs shrink the
    hint to almost nothing (two control images gave outputs 1/255 apart).  So, under `seed`: the
    zero convs get ordinary random weights, the hint encoder He-normal weights with zero biases
    (a black hint embeds to exactly zero) and a last conv scaled up until the hint's embedding
    is about as large as `conv_in`'s output it is added to.
    """
    with forked_seed(SEED):
        unet = base().unet
    with forked_seed(seed):
        controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=_CONDITIONING_CHANNELS)
        for conv in [*controlnet.controlnet_down_blocks, controlnet.controlnet_mid_block]:
            conv.reset_parameters()
        hint = controlnet.controlnet_cond_embedding
        for module in hint.modules():
            if isinstance(module, torch.nn.Conv2d):
                torch.nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
                torch.nn.init.zeros_(module.bias)
        with torch.no_grad():
            hint.conv_out.weight.mul_(_HINT_GAIN)
    return controlnet


def _write_controlnet(base: Callable[[], DiffusionPipeline], seed: int) -> Callable[[Path], None]:
    """A writer for a ControlNet shaped like `base()`'s UNet (see build_tiny_controlnet)."""

    def write(directory: Path) -> None:
        build_tiny_controlnet(base, seed).save_pretrained(str(directory), safe_serialization=True)

    return write


def _write_lora(seed: int) -> Callable[[Path], None]:
    """A writer for a random rank-4 LoRA over tiny-sd's UNet attention projections."""

    def write(directory: Path) -> None:
        from peft import LoraConfig
        from peft.utils import get_peft_model_state_dict

        with forked_seed(SEED):
            unet = build_tiny_sd().unet
        config = LoraConfig(
            r=4, lora_alpha=4, init_lora_weights=False, target_modules=list(LORA_TARGET_MODULES)
        )
        with forked_seed(seed):
            unet.add_adapter(config)  # init_lora_weights=False: A and B both random, so the LoRA changes outputs.
        StableDiffusionPipeline.save_lora_weights(
            str(directory),
            unet_lora_layers=get_peft_model_state_dict(unet),
            weight_name=LORA_FILE,
            safe_serialization=True,
        )

    return write


def _write_embedding(seed: int, token: str) -> Callable[[Path], None]:
    """A writer for a one-vector textual-inversion embedding sized to tiny-sd's text encoder."""

    def write(directory: Path) -> None:
        with forked_seed(SEED):
            text_encoder = build_tiny_sd().text_encoder
        hidden = text_encoder.config.hidden_size
        with forked_seed(seed):
            # About the scale of the encoder's own token embeddings, yet clearly not any of them.
            vector = torch.randn(1, hidden) * text_encoder.get_input_embeddings().weight.std().item()
        Path(directory).mkdir(parents=True, exist_ok=True)
        save_file({token: vector.contiguous()}, str(Path(directory) / EMBEDDING_FILE))

    return write


def _edit_entry(pipeline_class: str, source: str | None = None, **defaults: Any) -> dict[str, Any]:
    """An edit catalog entry for `pipeline_class`, over `source`'s directory when given (a writer-less spec)."""
    entry: dict[str, Any] = {
        "kind": "pipeline",
        "pipeline_class": pipeline_class,
        "tasks": ["edit"],
        "defaults": {**_EDIT_DEFAULTS, **defaults},
    }
    return {"source": source, **entry} if source else entry


EDIT_MODELS: dict[str, TinySpec] = {
    # Edit pipelines.
    "tiny-sd-img2img": TinySpec(None, _edit_entry("StableDiffusionImg2ImgPipeline", "tiny-sd", strength=0.75)),
    "tiny-sd-inpaint": TinySpec(None, _edit_entry("StableDiffusionInpaintPipeline", "tiny-sd", strength=1.0)),
    "tiny-sd-inpaint-9ch": TinySpec(
        save_pipeline(build_tiny_sd_inpaint_9ch), _edit_entry("StableDiffusionInpaintPipeline", strength=1.0)
    ),
    "tiny-pix2pix": TinySpec(
        save_pipeline(build_tiny_pix2pix),
        _edit_entry("StableDiffusionInstructPix2PixPipeline", image_guidance_scale=1.5),
    ),
    # ControlNets and the pipelines over them.
    "tiny-controlnet-sd": TinySpec(_write_controlnet(build_tiny_sd, SEED + 1), {"kind": "controlnet"}),
    "tiny-controlnet-sd-2": TinySpec(_write_controlnet(build_tiny_sd, SEED + 2), {"kind": "controlnet"}),
    "tiny-controlnet-sdxl": TinySpec(_write_controlnet(build_tiny_sdxl, SEED + 3), {"kind": "controlnet"}),
    "tiny-sd-controlnet": TinySpec(
        None,
        image_entry(
            source="tiny-sd",
            pipeline_class="StableDiffusionControlNetPipeline",
            controlnets=["tiny-controlnet-sd"],
        ),
    ),
    "tiny-sd-multicontrolnet": TinySpec(
        None,
        image_entry(
            source="tiny-sd",
            pipeline_class="StableDiffusionControlNetPipeline",
            controlnets=["tiny-controlnet-sd", "tiny-controlnet-sd-2"],
        ),
    ),
    "tiny-sdxl-controlnet": TinySpec(
        None,
        image_entry(
            source="tiny-sdxl",
            pipeline_class="StableDiffusionXLControlNetPipeline",
            controlnets=["tiny-controlnet-sdxl"],
        ),
    ),
    # Multi-ControlNet for SDXL: the same tiny net twice is enough to exercise MultiControlNetModel.
    "tiny-sdxl-multicontrolnet": TinySpec(
        None,
        image_entry(
            source="tiny-sdxl",
            pipeline_class="StableDiffusionXLControlNetPipeline",
            controlnets=["tiny-controlnet-sdxl", "tiny-controlnet-sdxl"],
        ),
    ),
    # Adapters for tiny-sd.
    "tiny-lora-sd": TinySpec(_write_lora(SEED + 11), {"kind": "lora"}),
    "tiny-lora-sd-2": TinySpec(_write_lora(SEED + 12), {"kind": "lora"}),
    "tiny-embedding-sd": TinySpec(
        _write_embedding(SEED + 21, EMBEDDING_TOKEN), {"kind": "embedding", "token": EMBEDDING_TOKEN}
    ),
}
"""Name -> spec for the edit/ControlNet/adapter tiny models; the name is also the directory and catalog key."""
