"""Placing a loaded pipeline on its device under a catalog Policy: offload, slicing, chunking, layout, compile.

Every step is a diffusers or torch feature applied in place, so the pipeline object (and any
`from_pipe` pipelines sharing its components) keeps working unchanged; `place` returns what it
actually did, so callers can report it (offload resolved from `auto`, compile time apart).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from diffusers import DiffusionPipeline

from pipelines.catalog import Policy

log = logging.getLogger(__name__)

FIT_FRACTION = 0.75
"""Weights may take this share of the free memory under `offload: auto`; the rest is left for activations."""


@dataclass
class Placed:
    """What `place` did: the offload actually used, device bytes held, the steps applied, compile figures."""

    offload: str
    device_bytes: int
    applied: list[str] = field(default_factory=list)
    compiled: str = "none"
    compile_s: float | None = None  # the warm-up call that compiled the denoiser (None: not compiled or no warm-up)


def denoiser(pipe: DiffusionPipeline) -> torch.nn.Module | None:
    """The model the sampling loop calls every step (UNet or transformer), where compile and chunking pay off."""
    for name in ("unet", "transformer", "prior", "decoder"):
        model = getattr(pipe, name, None)
        if isinstance(model, torch.nn.Module):
            return model
    return None


def component_bytes(pipe: DiffusionPipeline) -> dict[str, int]:
    """Bytes of each torch component's weights and buffers, for choosing an offload."""
    sizes = {}
    for name, component in pipe.components.items():
        if isinstance(component, torch.nn.Module):
            tensors = list(component.parameters()) + list(component.buffers())
            sizes[name] = sum(t.numel() * t.element_size() for t in tensors)
    return sizes


def choose_offload(sizes: dict[str, int], free_bytes: int) -> str:
    """`offload: auto`: none if everything fits, model if the largest component fits, else group."""
    room = free_bytes * FIT_FRACTION
    if sum(sizes.values()) <= room:
        return "none"
    if max(sizes.values(), default=0) <= room:
        return "model"
    return "group"


def free_device_bytes(device: torch.device) -> int | None:
    """Free bytes on an accelerator right now (other actors sharing it included), None on CPU."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    return None


def group_offload(pipe: DiffusionPipeline, onload: torch.device, blocks: int = 1) -> None:
    """diffusers' group offloading over every component but the VAE: `blocks` per group (0: leaf level), streamed on CUDA.

    The VAE stays on the device: it is small next to its own activations, and fp16 pipelines with
    `force_upcast` (SDXL) re-cast it to fp32 for decoding, which the hooks' offloaded copies do not follow
    (seen on an H200: "Input type (float) and bias type (c10::Half) should be the same").
    """
    stream = onload.type == "cuda" and torch.cuda.is_available()
    level = {"offload_type": "leaf_level"} if blocks == 0 else {"offload_type": "block_level", "num_blocks_per_group": blocks}
    keep = [name for name in ("vae",) if isinstance(getattr(pipe, name, None), torch.nn.Module)]
    pipe.enable_group_offload(onload_device=onload, offload_device=torch.device("cpu"), use_stream=stream,
                              non_blocking=stream, exclude_modules=keep or None, **level)


def chunk_feed_forward(pipe: DiffusionPipeline) -> int:
    """Feed-forward chunking, one sample at a time (divides any batch; token chunks must divide every level)."""
    model = denoiser(pipe)
    if model is None:
        return 0
    if hasattr(model, "enable_forward_chunking"):
        model.enable_forward_chunking(chunk_size=1, dim=0)
    blocks = [m for m in model.modules() if hasattr(m, "set_chunk_feed_forward")]
    for block in blocks:
        block.set_chunk_feed_forward(1, dim=0)
    return len(blocks)


def channels_last(pipe: DiffusionPipeline) -> list[str]:
    """Denoiser and VAE in channels-last layout, which cuDNN convolutions run faster in; returns what changed."""
    changed = []
    for name in ("unet", "vae", "controlnet"):
        model = getattr(pipe, name, None)
        if isinstance(model, torch.nn.Module):
            model.to(memory_format=torch.channels_last)
            changed.append(name)
    return changed


def compile_denoiser(pipe: DiffusionPipeline, policy: Policy) -> str:
    """torch.compile on the denoiser, in place: its repeated blocks if diffusers marks them (regional), else whole."""
    model = denoiser(pipe)
    if model is None:
        return "none"
    options = {"mode": None if policy.compile_mode == "default" else policy.compile_mode, "backend": policy.compile_backend}
    if policy.compile == "regional" and getattr(model, "_repeated_blocks", None) and hasattr(model, "compile_repeated_blocks"):
        try:
            model.compile_repeated_blocks(**options)
            return "regional"
        except ValueError as e:  # the marked block classes are not in this model
            log.info("regional compile not possible (%s): compiling the whole denoiser", e)
    model.compile(**options)
    return "full"


def compile_seconds() -> float:
    """Seconds torch.compile has spent in this process so far (recompiles for new shapes included)."""
    try:
        from torch._dynamo.utils import compilation_time_metrics
    except ImportError:  # pragma: no cover - older torch
        return 0.0
    return float(sum(compilation_time_metrics.get("_compile.compile_inner", [])))


def warm_up(pipe: DiffusionPipeline) -> float | None:
    """One 2-step call at the default size, so the first render does not pay the compile; None if the family needs inputs."""
    started = time.perf_counter()
    try:
        pipe(prompt="warm-up", num_inference_steps=2, output_type="latent")
    except Exception as e:  # noqa: BLE001 - optional: families that need inputs (edits, audio...) compile on first render
        log.info("no warm-up call for %s (%s): the first render compiles", type(pipe).__name__, e)
        return None
    return time.perf_counter() - started


def place(pipe: DiffusionPipeline, policy: Policy, device: torch.device, free_bytes: int | None = None,
          warm: bool = True) -> Placed:
    """Places the pipeline on its device as the policy asks; `free_bytes` (the actor's share) decides `auto`."""
    sizes = component_bytes(pipe)
    offload = policy.offload
    if offload == "auto":
        offload = "none" if device.type == "cpu" or free_bytes is None else choose_offload(sizes, free_bytes)
        log.info("offload=auto chose %s (%.0f MB of weights, %s free)", offload, sum(sizes.values()) / 2**20,
                 "?" if free_bytes is None else f"{free_bytes / 2**20:.0f} MB")
    if offload != "none" and device.type == "cpu":
        log.warning("offload=%s ignored: no accelerator, the pipeline stays on CPU", offload)
        offload = "none"
    if policy.channels_last:  # before offload hooks capture the weights
        channels_last(pipe)
    if offload == "model":
        pipe.enable_model_cpu_offload(device=device)
    elif offload == "sequential":
        pipe.enable_sequential_cpu_offload(device=device)
    elif offload == "group":
        group_offload(pipe, device, policy.group_blocks)
    else:
        pipe.to(device)
    done = Placed(offload, {"none": sum(sizes.values()), "model": max(sizes.values(), default=0)}.get(offload, 0))
    done.applied += _memory_savers(pipe, policy)
    if policy.channels_last:
        done.applied.append("channels_last")
    if policy.compile != "none":
        done.compiled = compile_denoiser(pipe, policy)
        done.applied.append(f"compile:{done.compiled}")
        if warm:
            before = compile_seconds()
            took = warm_up(pipe)
            done.compile_s = None if took is None else max(compile_seconds() - before, 0.0) or took
    return done


def _memory_savers(pipe: DiffusionPipeline, policy: Policy) -> list[str]:
    """Attention slicing, VAE slicing and tiling, feed-forward chunking, where the pipeline has them."""
    applied = []
    if policy.attention_slicing and hasattr(pipe, "enable_attention_slicing"):
        pipe.enable_attention_slicing()
        applied.append("attention_slicing")
    vae: Any = getattr(pipe, "vae", None)
    if policy.vae_slicing and hasattr(vae, "enable_slicing"):
        vae.enable_slicing()
        applied.append("vae_slicing")
    if policy.vae_tiling and hasattr(vae, "enable_tiling"):
        vae.enable_tiling()
        applied.append("vae_tiling")
    if policy.ff_chunking and chunk_feed_forward(pipe):
        applied.append("ff_chunking")
    return applied
