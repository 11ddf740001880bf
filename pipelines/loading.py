"""Loading pipelines from local dirs or Hub ids, safetensors only (placing them under a policy: pipelines/placement.py)."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import diffusers
import torch
from diffusers import DiffusionPipeline


log = logging.getLogger(__name__)

_PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth", ".pkl")


class ModelLoadError(RuntimeError):
    """A model could not be loaded; the message says which and why."""


def quiet_hf_progress() -> None:
    """Per-component loading bars drown job logs; our own progress says what matters."""
    import transformers

    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()


def pick_device(requested: str = "auto") -> torch.device:
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(requested)


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    """`auto` is float16 on accelerators and float32 on CPU."""
    if name == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    return getattr(torch, name)


def check_safetensors(model_dir: str | os.PathLike) -> None:
    """Refuses a local model whose weights exist only as pickle files."""
    root = Path(model_dir)
    pickles = sorted(p for p in root.rglob("*") if p.suffix in _PICKLE_SUFFIXES)
    if not pickles:
        return
    pickle_dirs = {p.parent for p in pickles}
    safe_dirs = {p.parent for p in root.rglob("*.safetensors")}
    unsafe = sorted(pickle_dirs - safe_dirs)
    if unsafe:
        names = ", ".join(str(p.relative_to(root)) for p in pickles if p.parent in unsafe)
        raise ModelLoadError(
            f"model at {root} has pickle-only weights ({names}); renderfleet loads safetensors only: "
            "convert them (e.g. load and save_pretrained(safe_serialization=True))"
        )


def load_base(source: str, revision: str | None, dtype: torch.dtype) -> DiffusionPipeline:
    """Loads a checkpoint (local dir or Hub id, safetensors only) on the host, as its own pipeline class."""
    if os.path.isdir(source):
        check_safetensors(source)
    try:
        pipe = DiffusionPipeline.from_pretrained(source, revision=revision, dtype=dtype, use_safetensors=True)
    except (OSError, ValueError, EnvironmentError) as e:
        raise ModelLoadError(f"cannot load {source}: {e}") from e
    pipe.set_progress_bar_config(disable=True)
    return pipe


def derive(base: DiffusionPipeline, pipeline_class: str | None, **components: Any) -> DiffusionPipeline:
    """Another diffusers pipeline over the same loaded components (weights shared, not reloaded)."""
    if not pipeline_class or (type(base).__name__ == pipeline_class and not components):
        return base
    cls = getattr(diffusers, pipeline_class, None)
    if cls is None or not hasattr(cls, "from_pipe"):
        raise ModelLoadError(f"pipeline_class {pipeline_class!r} is not a diffusers pipeline")
    try:
        pipe = cls.from_pipe(base, **components)
    except (TypeError, ValueError) as e:
        raise ModelLoadError(f"cannot build {pipeline_class} over {type(base).__name__}: {e}") from e
    pipe.set_progress_bar_config(disable=True)
    return pipe


def load_controlnet(source: str, revision: str | None, dtype: torch.dtype) -> Any:
    """A ControlNet model for a pipeline's `controlnet` component, on the host until placed."""
    if os.path.isdir(source):
        check_safetensors(source)
    try:
        return diffusers.ControlNetModel.from_pretrained(source, revision=revision, dtype=dtype, use_safetensors=True)
    except (OSError, ValueError, EnvironmentError) as e:
        raise ModelLoadError(f"cannot load controlnet {source}: {e}") from e


def memory_bytes(model: DiffusionPipeline | torch.nn.Module) -> int:
    """Bytes held by a pipeline's (or one model's) weights, for the per-actor model budget."""
    total = 0
    for component in ([model] if isinstance(model, torch.nn.Module) else model.components.values()):
        if isinstance(component, torch.nn.Module):
            total += sum(t.numel() * t.element_size() for t in component.parameters())
            total += sum(t.numel() * t.element_size() for t in component.buffers())
    return total


def default_size(pipe: DiffusionPipeline) -> tuple[int, int]:
    """The pipeline's native (width, height), from its denoiser's sample size."""
    denoiser = getattr(pipe, "unet", None) or getattr(pipe, "transformer", None)
    sample = getattr(getattr(denoiser, "config", None), "sample_size", None) or 64
    scale = getattr(pipe, "vae_scale_factor", 8)
    h, w = (sample, sample) if isinstance(sample, int) else sample
    return int(w * scale), int(h * scale)
