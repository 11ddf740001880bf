"""SD 1.5- and SDXL-architecture pipelines with random weights, built from the published configs in bench/configs/.

The accelerator machine has no network: the configs are committed copies of the checkpoints' own
config.json files (unet, vae, text encoders, scheduler), so the models have the real checkpoints'
shapes and FLOPs (SD 1.5 UNet 859.5M parameters, SDXL UNet 2567.5M); weights are drawn on the device
itself. Tokenizers are the small local CLIP tokenizer the tiny models use (token ids only feed the
text encoder's embedding, so the FLOPs are the same). `smoke` shrinks every width and depth so the
whole path runs on a CPU in seconds.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import diffusers
import torch
from diffusers import AutoencoderKL, DiffusionPipeline, StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from pipelines.tiny.common import clip_tokenizer

CONFIGS = Path(__file__).resolve().parent / "configs"
ARCHS = ("sd15", "sdxl")
COMPONENTS = {"sd15": ("unet", "vae", "text_encoder", "scheduler"),
              "sdxl": ("unet", "vae", "text_encoder", "text_encoder_2", "scheduler")}


def load_configs(arch: str, smoke: bool = False) -> dict[str, dict[str, Any]]:
    """The committed configs of one architecture, shrunk to tiny widths for `smoke`."""
    configs = {name: json.loads((CONFIGS / arch / f"{name}.json").read_text()) for name in COMPONENTS[arch]}
    return shrink(configs) if smoke else configs


def shrink(configs: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Same block structure and conditioning, tiny widths: the smoke test exercises every code path fast."""
    out = {k: dict(v) for k, v in configs.items()}
    unet = out["unet"]
    levels = len(unet["block_out_channels"])
    unet.update(block_out_channels=[32, 64, 64, 64][:levels], layers_per_block=1, norm_num_groups=8, sample_size=8)
    heads = unet["attention_head_dim"]
    unet["attention_head_dim"] = [2, 4, 8, 8][:levels] if isinstance(heads, list) else 4
    if isinstance(unet.get("transformer_layers_per_block"), list):
        unet["transformer_layers_per_block"] = [1] * levels
    for name in ("text_encoder", "text_encoder_2"):
        if name in out:
            out[name].update(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                             projection_dim=32)
    texts = [n for n in ("text_encoder", "text_encoder_2") if n in out]
    unet["cross_attention_dim"] = 32 * len(texts)
    if unet.get("addition_embed_type") == "text_time":
        unet.update(addition_time_embed_dim=8, projection_class_embeddings_input_dim=6 * 8 + 32)
    out["vae"].update(block_out_channels=[8, 16, 16, 16], layers_per_block=1, norm_num_groups=8, sample_size=64)
    return out


def _clip(config: dict[str, Any], cls: type) -> torch.nn.Module:
    return cls(CLIPTextConfig(**{k: v for k, v in config.items() if not k.startswith("_") and k != "architectures"}))


def build(arch: str, device: torch.device, dtype: torch.dtype, smoke: bool = False) -> DiffusionPipeline:
    """A pipeline of the architecture with random weights drawn on `device`, in `dtype`."""
    configs = load_configs(arch, smoke)
    scheduler_config = configs["scheduler"]
    scheduler = getattr(diffusers, scheduler_config["_class_name"]).from_config(scheduler_config)
    with torch.device(device):
        parts: dict[str, Any] = {
            "unet": UNet2DConditionModel.from_config(configs["unet"]),
            "vae": AutoencoderKL.from_config(configs["vae"]),
            "text_encoder": _clip(configs["text_encoder"], CLIPTextModel),
        }
        if arch == "sdxl":
            parts["text_encoder_2"] = _clip(configs["text_encoder_2"], CLIPTextModelWithProjection)
    for model in parts.values():
        model.to(dtype=dtype).eval()
    if arch == "sdxl":
        pipe = StableDiffusionXLPipeline(tokenizer=clip_tokenizer(), tokenizer_2=clip_tokenizer(), scheduler=scheduler,
                                         force_zeros_for_empty_prompt=True, **parts)
    else:
        pipe = StableDiffusionPipeline(tokenizer=clip_tokenizer(), scheduler=scheduler, safety_checker=None,
                                       feature_extractor=None, requires_safety_checker=False, **parts)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def parameters(pipe: DiffusionPipeline) -> dict[str, int]:
    """Parameter count per torch component, to show the models are full size."""
    return {name: sum(p.numel() for p in m.parameters())
            for name, m in pipe.components.items() if isinstance(m, torch.nn.Module)}
