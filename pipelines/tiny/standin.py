"""A stand-in renderer for benchmarks: a real DiffusionPipeline that sleeps instead of computing.

It models an accelerator that leaves the host CPU free (the sleep releases the GIL), or, with no
sleep, a no-op model, so the job's own costs (orchestration, finishing, results) can be measured
apart. It is saved with ``save_pretrained`` and loaded by the ordinary catalog -> model pool ->
``DiffusionPipeline.from_pretrained`` path; diffusers resolves a local pipeline's class by name in
its own namespace, so :func:`register` adds the class there (a Ray ``worker_process_setup_hook``
in every process that loads it). It is not part of the tiny catalog: :func:`build_standin_catalog`
writes a catalog of its own.

``RENDERFLEET_STANDIN_SLOWDOWN`` (a factor, default 1) in a process's environment multiplies its sleep:
a multi-node test gives one node's processes 2 to stand in for a device half as fast.
"""

from __future__ import annotations

import os
import time
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from diffusers import DiffusionPipeline
from diffusers.pipelines.pipeline_utils import ImagePipelineOutput
from PIL import Image

__all__ = ["SLOWDOWN_ENV", "StandinPipeline", "build_standin", "build_standin_catalog", "register", "slowdown"]

SLOWDOWN_ENV = "RENDERFLEET_STANDIN_SLOWDOWN"


def slowdown() -> float:
    """This process's sleep factor from SLOWDOWN_ENV (a node's environment reaches its workers); 1 when unset."""
    try:
        return max(0.0, float(os.environ.get(SLOWDOWN_ENV, "1") or 1))
    except ValueError:
        return 1.0


class StandinPipeline(DiffusionPipeline):
    """Sleeps `(ms_per_call + ms_per_image * batch) * slowdown()` per call, then returns flat images of the requested size."""

    def __init__(self, ms_per_image: float = 0.0, ms_per_call: float = 0.0):
        super().__init__()
        self.register_to_config(ms_per_image=float(ms_per_image), ms_per_call=float(ms_per_call))

    def __call__(self, prompt: str | list[str] | None = None, width: int = 64, height: int = 64,
                 num_inference_steps: int = 1, generator: Any = None, output_type: str = "pil",
                 return_dict: bool = True) -> ImagePipelineOutput | tuple:
        prompts = [prompt] if isinstance(prompt, str) or prompt is None else list(prompt)
        delay = (self.config.ms_per_call + self.config.ms_per_image * len(prompts)) * slowdown()
        if delay > 0:
            time.sleep(delay / 1000.0)
        # A flat colour per prompt: cheap to make, and not free to encode (finishing still has work to do).
        images = []
        for i, p in enumerate(prompts):
            shade = (zlib.crc32((p or "").encode()) + i) % 200 + 28
            pixels = np.full((height, width, 3), shade, dtype=np.uint8)
            pixels[:, :, i % 3] = np.arange(width, dtype=np.uint8)[None, :] if width else 0
            images.append(pixels)
        if output_type == "pil":
            out: Any = [Image.fromarray(a) for a in images]
        else:
            out = np.stack(images).astype(np.float32) / 255.0
        return ImagePipelineOutput(images=out) if return_dict else (out,)


def register() -> None:
    """Makes `StandinPipeline` resolvable by name, as diffusers resolves a saved pipeline's class."""
    import diffusers

    setattr(diffusers, StandinPipeline.__name__, StandinPipeline)


def build_standin(folder: str | Path, ms_per_image: float = 0.0, ms_per_call: float = 0.0) -> Path:
    """Saves a stand-in pipeline with the given sleep into `folder` (model_index.json only: it has no weights)."""
    folder = Path(folder)
    StandinPipeline(ms_per_image=ms_per_image, ms_per_call=ms_per_call).save_pretrained(folder, safe_serialization=True)
    return folder


def build_standin_catalog(root: str | Path, sleeps_ms: dict[str, float], watermark: bool = True) -> Path:
    """A catalog of stand-ins, one per name -> ms per image (0 is the no-op renderer); returns its path."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    models = {}
    for name, ms in sleeps_ms.items():
        build_standin(root / name, ms_per_image=ms)
        models[name] = {"kind": "pipeline", "source": name, "tasks": ["image"],
                        "defaults": {"num_inference_steps": 1, "width": 64, "height": 64}}
    path = root / "catalog.yaml"
    path.write_text(yaml.safe_dump({"safety": {"watermark": watermark}, "models": models}, sort_keys=False))
    return path
