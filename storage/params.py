"""The render parameters: one table that drives manifest columns, row validation, the grouping of
rows into pipeline calls, the call's arguments and the online request models.

Adding a diffusers argument is one `Param` line in PARAMETERS (plus its test): the manifest
accepts the column, catalog entries may default it, rows that differ in it never share a call,
the pipeline receives it (where its signature takes it), and online requests for its tasks accept it.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from typing import Any

from storage.reasons import RowError


@dataclass(frozen=True)
class Limits:
    """Bounds on per-row values, the same for batch rows and online requests."""

    max_steps: int = 200
    max_pixels: int = 2048 * 2048
    max_prompt_chars: int = 10_000
    max_frames: int = 256
    max_fps: float = 120.0
    max_audio_s: float = 120.0
    max_input_bytes: int = 50 * 1024 * 1024
    max_input_pixels: int = 4096 * 4096


@dataclass(frozen=True)
class Param:
    """One render parameter: its column kind, bounds, failure reason and where it goes."""

    name: str
    kind: str  # manifest column kind: "int", "number" or "number_or_numbers"
    low: float
    high: float | str  # a number, or the name of a Limits field
    reason: str  # the row failure code when out of bounds
    tasks: tuple[str, ...] = ()  # tasks it applies to online; () = every task
    call: bool = True  # a pipeline call argument (one value per call); False: used after rendering
    description: str = ""

    def bounds(self, limits: Limits) -> tuple[float, float]:
        high = getattr(limits, self.high) if isinstance(self.high, str) else self.high
        return self.low, high

    @property
    def integer(self) -> bool:
        return self.kind == "int"

    def check(self, value: Any, limits: Limits) -> Any:
        """The value cast and bounds-checked (RowError naming the parameter otherwise)."""
        if value is None:
            return None
        if isinstance(value, (list, tuple)):
            if self.kind != "number_or_numbers":
                raise RowError(self.reason, f"{self.name}={value!r} must be a single number")
            return tuple(self.check(v, limits) for v in value)
        low, high = self.bounds(limits)
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise RowError(self.reason, f"{self.name}={value!r} is not a number") from None
        if not math.isfinite(number) or not (low <= number <= high):
            raise RowError(self.reason, f"{self.name}={value} must be in {low:g}..{high:g}")
        if self.integer:
            if number != int(number):
                raise RowError(self.reason, f"{self.name}={value} must be a whole number")
            return int(number)
        return number


PARAMETERS: tuple[Param, ...] = (
    Param("num_inference_steps", "int", 1, "max_steps", "invalid_steps", description="denoising steps"),
    Param("guidance_scale", "number", 0.0, 100.0, "invalid_guidance", description="classifier-free guidance"),
    Param("strength", "number", 0.0, 1.0, "invalid_strength", tasks=("edit",),
          description="how far an edit departs from its input image"),
    Param("image_guidance_scale", "number", 0.0, 100.0, "invalid_guidance", tasks=("edit",),
          description="instruct-pix2pix: pull towards the input image"),
    Param("num_frames", "int", 1, "max_frames", "invalid_frames", tasks=("video",), description="video length in frames"),
    Param("fps", "number", 0.1, "max_fps", "invalid_fps", tasks=("video",), call=False,
          description="frames per second of the encoded video"),
    Param("audio_length_in_s", "number", 0.1, "max_audio_s", "invalid_audio_length", tasks=("audio",),
          description="audio clip length in seconds"),
    Param("controlnet_conditioning_scale", "number_or_numbers", 0.0, 10.0, "invalid_controlnet_scale",
          tasks=("image", "edit"), description="ControlNet weight (one per ControlNet)"),
)
BY_NAME: dict[str, Param] = {p.name: p for p in PARAMETERS}
# Every name a catalog entry's `defaults` may give for the row (others are family-specific call arguments).
ROW_DEFAULTS = ("negative_prompt", "width", "height", "output_format", *BY_NAME)


@dataclass(frozen=True)
class RowParams:
    """A row's validated render parameters, defaults applied.

    Tabled parameters live in `values` (table order) and read as attributes: `p.num_inference_steps`.
    """

    id: str
    task: str
    prompt: str | None
    negative_prompt: str | None
    seed: int
    width: int | None
    height: int | None
    output_format: str
    values: dict[str, Any] = field(default_factory=dict)
    image_uri: str | None = None
    mask_uri: str | None = None
    class_label: int | None = None
    control_image_uris: tuple[str, ...] = ()
    loras: tuple[tuple[str, float], ...] = ()
    embeddings: tuple[str, ...] = ()

    def __getattr__(self, name: str) -> Any:
        if name in BY_NAME and "values" in self.__dict__:
            return self.values.get(name)
        raise AttributeError(name)

    def call_values(self) -> tuple[tuple[str, Any], ...]:
        """The per-call parameters, hashable: rows share a pipeline call only when these match."""
        return tuple((p.name, self.values.get(p.name)) for p in PARAMETERS if p.call)


def derive_seed(row_id: str) -> int:
    """A deterministic non-negative int64 seed for rows that give none."""
    return int.from_bytes(hashlib.sha256(row_id.encode("utf-8")).digest()[:8], "big") & (2**63 - 1)


def check_size(width: Any, height: Any, limits: Limits) -> None:
    """Rejects sizes that are not positive multiples of 8 or exceed the pixel limit."""
    for name, v in (("width", width), ("height", height)):
        if v is None:
            continue
        if isinstance(v, bool) or not isinstance(v, int) and not (isinstance(v, float) and v.is_integer()):
            raise RowError("invalid_size", f"{name}={v!r} must be a whole number")
        if int(v) <= 0 or int(v) % 8 or int(v) > 1 << 20:
            raise RowError("invalid_size", f"{name}={v} must be a positive multiple of 8")
    if width is not None and height is not None and int(width) * int(height) > limits.max_pixels:
        raise RowError("invalid_size", f"{width}x{height} is {int(width) * int(height)} pixels, limit {limits.max_pixels}")


def resolve_row(row: dict[str, Any], defaults: dict[str, Any], limits: Limits, task_formats: dict[str, tuple[str, ...]],
                needs_prompt: bool = True) -> RowParams:
    """Merges catalog defaults under a row's values and validates them (RowError on a bad value).

    `task_formats` maps each task to its output formats (the first is the default); it comes from
    the media format table, which storage does not import.
    """

    def value(name: str) -> Any:
        v = row.get(name)
        return defaults.get(name) if v is None else v

    task = row.get("task") or "image"
    if task not in task_formats:
        raise RowError("unknown_task", f"task={task!r}; expected one of {', '.join(task_formats)}")
    prompt = row.get("prompt")
    if needs_prompt and (prompt is None or not str(prompt).strip()):
        raise RowError("missing_prompt", "row has no prompt")
    if prompt is not None and len(prompt) > limits.max_prompt_chars:
        raise RowError("invalid_prompt", f"prompt has {len(prompt)} characters, limit {limits.max_prompt_chars}")
    values = {p.name: p.check(value(p.name), limits) for p in PARAMETERS}
    width, height = value("width"), value("height")
    check_size(width, height, limits)
    formats = task_formats[task]
    fmt = str(value("output_format") or formats[0]).lower()
    if fmt == "jpg":
        fmt = "jpeg"
    if fmt not in formats:
        raise RowError("invalid_output_format", f"output_format={fmt!r} for task {task}; expected one of {', '.join(formats)}")
    steps, strength = values["num_inference_steps"], values["strength"]
    if task == "edit" and steps is not None and strength is not None and int(steps * strength) < 1:
        raise RowError("invalid_strength", f"strength={strength} x num_inference_steps={steps} leaves no denoising step; "
                                           "raise either so that their product is at least 1")
    if task == "edit" and not row.get("image_uri"):
        raise RowError("missing_input", "edit rows need an image_uri")
    if row.get("mask_uri") and not row.get("image_uri"):
        raise RowError("missing_input", "mask_uri needs an image_uri")
    lora_scale = Param("lora scale", "number", -10.0, 10.0, "invalid_lora")
    loras = []
    for item in row.get("loras") or []:
        if not item or not item.get("uri"):
            raise RowError("invalid_lora", f"loras entries need a uri, got {item!r}")
        loras.append((str(item["uri"]), lora_scale.check(1.0 if item.get("scale") is None else item["scale"], limits)))
    seed = row.get("seed")
    if seed is not None and not (0 <= int(seed) < 2**63):
        raise RowError("invalid_seed", f"seed={seed} must be in 0..2**63-1")
    return RowParams(
        id=row["id"],
        task=task,
        prompt=prompt,
        negative_prompt=value("negative_prompt"),
        seed=derive_seed(row["id"]) if seed is None else int(seed),
        width=None if width is None else int(width),
        height=None if height is None else int(height),
        output_format=fmt,
        values=values,
        image_uri=row.get("image_uri"),
        mask_uri=row.get("mask_uri"),
        class_label=None if row.get("class_label") is None else int(row["class_label"]),
        control_image_uris=tuple(row.get("control_image_uris") or ()),
        loras=tuple(loras),
        embeddings=tuple(row.get("embeddings") or ()),
    )
