"""Output safety checking, outside the pipelines so one checker covers every family.

The checker is diffusers' ``StableDiffusionSafetyChecker`` (CLIP vision tower + concept embeddings)
with its ``CLIPImageProcessor``, loaded from safetensors only, from either layout:

* the Hub checker's own (``CompVis/stable-diffusion-safety-checker``): ``config.json``,
  ``model.safetensors``, ``preprocessor_config.json`` in one directory;
* a pipeline's: ``safety_checker/`` and ``feature_extractor/`` subfolders (e.g. an SD 1.5 checkout).

`SafetyChecker.check` only says which images are flagged; what happens to a flagged output is the
caller's choice among `ACTIONS` (``block``: no output, ``blur``: write `blur(image)`, ``flag``: write
it as is and record the flag). For video, `frames_to_check` picks the frames to check.
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path

import PIL.Image
import PIL.ImageFilter
import torch

from pipelines.loading import ModelLoadError, check_safetensors

__all__ = ["ACTIONS", "SafetyChecker", "blur", "frames_to_check", "checker_dirs", "processor_class"]

ACTIONS = ("block", "blur", "flag")
"""What to do with a flagged output: drop it, write a blurred copy, or write it and record the flag."""

_CHECKER_LOGGER = "diffusers.pipelines.stable_diffusion.safety_checker"


class _Quiet(logging.Filter):
    """Drops the checker's "a black image will be returned" warning while *we* call it (we black out nothing)."""

    def __init__(self) -> None:
        super().__init__()
        self.local = threading.local()

    def filter(self, record: logging.LogRecord) -> bool:
        return not getattr(self.local, "active", False)


_QUIET = _Quiet()
logging.getLogger(_CHECKER_LOGGER).addFilter(_QUIET)


def checker_dirs(path: str | os.PathLike) -> tuple[Path, Path]:
    """(model dir, image processor dir) for either layout; ModelLoadError when it is neither."""
    root = Path(path).expanduser()
    if (root / "safety_checker" / "config.json").is_file():
        model_dir = root / "safety_checker"
        processor_dir = root / "feature_extractor"
    elif (root / "config.json").is_file():
        model_dir = processor_dir = root
    else:
        raise ModelLoadError(
            f"no safety checker at {root}: expected config.json + model.safetensors + preprocessor_config.json, "
            "or safety_checker/ and feature_extractor/ subfolders"
        )
    if not (processor_dir / "preprocessor_config.json").is_file():
        raise ModelLoadError(f"safety checker at {root} has no {processor_dir.relative_to(root) / 'preprocessor_config.json'}")
    check_safetensors(model_dir)
    if not any(model_dir.glob("*.safetensors")):
        raise ModelLoadError(f"safety checker at {model_dir} has no .safetensors weights; renderfleet loads safetensors only")
    return model_dir, processor_dir


def processor_class() -> type:
    """CLIPImageProcessor, or its PIL twin where torchvision is missing (what transformers 5 falls back to, minus its warning)."""
    from transformers.utils import is_torchvision_available

    if is_torchvision_available():
        from transformers import CLIPImageProcessor

        return CLIPImageProcessor
    from transformers import CLIPImageProcessorPil

    return CLIPImageProcessorPil


class SafetyChecker:
    """diffusers' StableDiffusionSafetyChecker with its CLIPImageProcessor."""

    def __init__(self, model, processor, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
        self.model = model.to(device=device, dtype=dtype).eval()
        self.processor = processor
        self.device = torch.device(device)
        self.dtype = dtype

    @classmethod
    def from_pretrained(cls, path: str, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> SafetyChecker:
        """Loads a local checker directory (Hub checker layout or pipeline layout), safetensors only."""
        from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker

        model_dir, processor_dir = checker_dirs(path)
        try:
            model = StableDiffusionSafetyChecker.from_pretrained(str(model_dir), use_safetensors=True, dtype=dtype)
            processor = processor_class().from_pretrained(str(processor_dir))
        except (OSError, ValueError) as e:
            raise ModelLoadError(f"cannot load safety checker from {path}: {e}") from e
        return cls(model, processor, device=device, dtype=dtype)

    @torch.inference_mode()
    def check(self, images: list[PIL.Image.Image]) -> list[bool]:
        """One flag per image (True = flagged as NSFW), all images in one forward pass."""
        if not images:
            return []
        rgb = [im if im.mode == "RGB" else im.convert("RGB") for im in images]
        pixels = self.processor(images=rgb, return_tensors="pt").pixel_values
        pixels = pixels.to(device=self.device, dtype=self.dtype)
        # The checker blacks out flagged entries of `images` in place: hand it placeholders, not ours.
        placeholders = torch.zeros(len(rgb), 1)
        _QUIET.local.active = True
        try:
            _, has_nsfw = self.model(clip_input=pixels, images=placeholders)
        finally:
            _QUIET.local.active = False
        return [bool(flag) for flag in has_nsfw]


def blur(image: PIL.Image.Image) -> PIL.Image.Image:
    """A heavily blurred copy (downscaled to at most 8 px, scaled back, Gaussian-blurred): same size and mode."""
    mode = image.mode
    work_mode = mode if mode in ("RGB", "RGBA", "L", "LA") else ("RGBA" if "A" in mode or "transparency" in image.info else "RGB")
    work = image if work_mode == mode else image.convert(work_mode)
    w, h = work.size
    scale = 8 / max(w, h)
    small = work.resize((max(1, round(w * scale)), max(1, round(h * scale))), PIL.Image.Resampling.BOX)
    out = small.resize((w, h), PIL.Image.Resampling.BILINEAR)
    out = out.filter(PIL.ImageFilter.GaussianBlur(radius=max(1.0, max(w, h) / 16)))
    return out if work_mode == mode else out.convert(mode)


def frames_to_check(num_frames: int, every: int) -> list[int]:
    """Indices of every `every`-th frame plus the first and last, sorted and unique."""
    if every < 1:
        raise ValueError(f"every must be >= 1, got {every}")
    if num_frames <= 0:
        return []
    return sorted(set(range(0, num_frames, every)) | {0, num_frames - 1})
