"""Per-task adapters: a group of rows to one pipeline call's arguments, and its output to files.

One adapter serves every diffusers family whose inputs and outputs match a task: arguments
are filtered by the pipeline's own signature, and the few names that differ per family are
mapped in FAMILY_ARGUMENTS. Adding a family should mean a catalog entry, not code here.
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from diffusers import DiffusionPipeline
from PIL import Image

from pipelines.progress import StepReport, StepTally, requested_steps, step_hooks

# Our argument name -> the family's, by pipeline class name.
FAMILY_ARGUMENTS: dict[str, dict[str, str]] = {
    "TextToVideoZeroPipeline": {"num_frames": "video_length"},
    "StableAudioPipeline": {"audio_length_in_s": "audio_end_in_s"},
    "ShapEPipeline": {"width": "frame_size"},
    "ShapEImg2ImgPipeline": {"width": "frame_size"},
}
# Families that only batch input images already run through their own image processor.
IMAGE_PROCESSOR_INPUT = {"ShapEImg2ImgPipeline"}
# Families whose __call__ renders one prompt at a time.
UNBATCHED = {"TextToVideoZeroPipeline"}
# Where each task's decoded outputs live on the pipeline's output object.
OUTPUT_FIELD = {"image": "images", "edit": "images", "video": "frames", "audio": "audios", "mesh": "images"}


@dataclass
class Request:
    """One row, decoded: what varies per item inside a call."""

    seed: int
    prompt: str | None = None
    negative_prompt: str | None = None
    image: Image.Image | None = None
    mask_image: Image.Image | None = None
    control_images: list[Image.Image] = field(default_factory=list)
    class_label: int | None = None


def call_parameters(pipe: DiffusionPipeline) -> frozenset[str]:
    """Names the pipeline's __call__ accepts, so one adapter serves many families."""
    return _parameters_of(type(pipe))


@functools.lru_cache(maxsize=None)
def _parameters_of(cls: type) -> frozenset[str]:
    """Per class, not per row: inspecting a signature on the render path adds up over millions of rows."""
    return frozenset(inspect.signature(cls.__call__).parameters) - {"self"}


def takes_prompt(pipe: DiffusionPipeline) -> bool:
    """Class-conditional and image-to-3D families render without a prompt."""
    return "prompt" in call_parameters(pipe)


def generators(seeds: list[int]) -> list[torch.Generator]:
    """One CPU generator per row: results match across devices and batch compositions."""
    return [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]


def call_arguments(pipe: DiffusionPipeline, shared: dict[str, Any], requests: list[Request], **extra: Any) -> dict[str, Any]:
    """The keyword arguments for one call over `requests`, in the family's own vocabulary."""
    accepted = call_parameters(pipe)
    renames = FAMILY_ARGUMENTS.get(type(pipe).__name__, {})
    kwargs: dict[str, Any] = {"generator": generators([r.seed for r in requests])}
    per_item: dict[str, list[Any]] = {
        "prompt": [r.prompt for r in requests],
        "negative_prompt": [r.negative_prompt for r in requests],
        "image": [r.image for r in requests],
        "mask_image": [r.mask_image for r in requests],
        "class_labels": [r.class_label for r in requests],
    }
    for name, values in per_item.items():
        if all(v is None for v in values):
            continue
        if name == "negative_prompt":
            values = [v or "" for v in values]
        kwargs[renames.get(name, name)] = values
    if requests[0].control_images:
        per_net = list(zip(*[r.control_images for r in requests]))
        # One ControlNet: a list per prompt. Several: one (B, 3, H, W) batch per ControlNet, the
        # form both SD and SDXL accept with a control image per prompt.
        control = list(per_net[0]) if len(per_net) == 1 else [_image_batch(images) for images in per_net]
        kwargs["control_image" if "control_image" in accepted else "image"] = control
    if type(pipe).__name__ in IMAGE_PROCESSOR_INPUT and kwargs.get("image") is not None:
        kwargs["image"] = pipe.image_processor(kwargs["image"], return_tensors="pt").pixel_values
    for name, value in shared.items():
        if value is None:
            continue
        if isinstance(value, tuple):
            value = value[0] if len(value) == 1 else list(value)
        kwargs[renames.get(name, name)] = value
    kwargs.update(extra)
    if "num_images_per_prompt" in accepted and "batch_size" in accepted and "prompt" not in accepted:
        kwargs["batch_size"] = len(requests)
    return {k: v for k, v in kwargs.items() if k in accepted}


def _image_batch(images: tuple[Image.Image, ...] | list[Image.Image]) -> torch.Tensor:
    """PIL images as one (B, 3, H, W) float batch in [0, 1]."""
    arrays = [np.asarray(i.convert("RGB"), dtype=np.float32) / 255.0 for i in images]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


def to_pil(images: Any) -> list[Image.Image]:
    """Images as PIL, whatever form the family returned them in."""
    if isinstance(images, list) and all(isinstance(i, Image.Image) for i in images):
        return images
    array = images.detach().cpu().float().numpy() if isinstance(images, torch.Tensor) else np.asarray(images)
    if array.ndim == 4 and array.shape[1] in (1, 3, 4) and array.shape[-1] not in (1, 3, 4):
        array = array.transpose(0, 2, 3, 1)
    if array.dtype != np.uint8:
        array = (np.clip(array, 0.0, 1.0) * 255).round().astype(np.uint8)
    return [Image.fromarray(a.squeeze(-1) if a.shape[-1] == 1 else a) for a in array]


def intermediate_output_type(next_stage: DiffusionPipeline) -> str:
    """What a cascade stage hands on: latents to an SDXL-style refiner, pixels as tensors otherwise."""
    return "latent" if "Img2Img" in type(next_stage).__name__ else "pt"


def render_group(task: str, stages: list[tuple[DiffusionPipeline, dict[str, Any]]], requests: list[Request],
                 on_step: StepReport | None = None) -> list[Any]:
    """Runs one group through the pipeline and any later cascade stages, each with its own shared
    arguments; returns one decoded output per request.

    Decoded outputs: image/edit -> PIL image; video -> list of HxWx3 uint8 frames;
    audio -> (waveform, sample rate); mesh -> trimesh.Trimesh. With on_step, every denoising step of
    every stage reports (steps done, steps total) for the whole group (families that report no steps: never).
    """
    unbatched = type(stages[0][0]).__name__ in UNBATCHED and len(requests) > 1
    calls = [[r] for r in requests] if unbatched else [requests]
    # One tally over every call and stage; nothing at all without a report, so batch renders pay no callback.
    tally = None if on_step is None else StepTally(on_step, [requested_steps(p, s) for p, s in stages] * len(calls))
    return [out for k, call in enumerate(calls) for out in _render_call(task, stages, call, tally, k * len(stages))]


def _render_call(task: str, stages: list[tuple[DiffusionPipeline, dict[str, Any]]], requests: list[Request],
                 tally: StepTally | None, first_stage: int) -> list[Any]:
    """One call of the group (all of it, or one request of a family that renders one at a time)."""
    first, shared = stages[0]

    def output_type(i: int) -> str:
        return intermediate_output_type(stages[i + 1][0]) if i + 1 < len(stages) else _final_output_type(task)

    def hooks(i: int) -> dict[str, Any]:
        pipe = stages[i][0]
        return {} if tally is None else step_hooks(pipe, call_parameters(pipe), tally.stage(first_stage + i))

    with torch.inference_mode():
        result = first(**call_arguments(first, shared, requests, output_type=output_type(0), **hooks(0)))
        for i, (stage, stage_shared) in enumerate(stages[1:], start=1):
            if "denoising_end" in shared:  # an ensemble of experts: the refiner starts where the base stopped
                stage_shared = {"denoising_start": shared["denoising_end"], **stage_shared}
            result = stage(**call_arguments(stage, stage_shared, [_without_inputs(r) for r in requests],
                                            image=result.images, output_type=output_type(i), **hooks(i)))
    outputs = getattr(result, OUTPUT_FIELD[task], None)
    if outputs is None:  # e.g. Text2Video-Zero returns its frames as `.images`
        outputs = result.images
    return decode(task, stages[-1][0], outputs, len(requests))


def _without_inputs(request: Request) -> Request:
    """Later cascade stages take the previous stage's output, not the row's own input image."""
    return Request(seed=request.seed, prompt=request.prompt, negative_prompt=request.negative_prompt,
                   class_label=request.class_label)


def _final_output_type(task: str) -> str:
    return {"image": "pil", "edit": "pil", "video": "np", "audio": "np", "mesh": "mesh"}[task]


def decode(task: str, pipe: DiffusionPipeline, outputs: Any, count: int) -> list[Any]:
    """Per-request decoded outputs from a pipeline's output field."""
    if task in ("image", "edit"):
        images = to_pil(outputs)
    elif task == "video":
        from pipelines.media.video import split_batch_frames

        images = split_batch_frames(outputs, count)
    elif task == "audio":
        from pipelines.media.audio import audio_waveforms, sample_rate

        rate = sample_rate(pipe)
        images = [(w, rate) for w in audio_waveforms(outputs, count)]
    else:
        from pipelines.media.mesh import meshes_from_output

        images = meshes_from_output(outputs, count)
    if len(images) != count:
        raise RuntimeError(f"pipeline returned {len(images)} outputs for {count} requests")
    return images
