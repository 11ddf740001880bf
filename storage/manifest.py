"""The manifest: one Parquet row per asset to render.

Schema problems stop a job before anything renders; bad values fail only their row.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads

from storage.fs import filesystem

TASKS = ("image", "edit", "video", "mesh", "audio")
# Task -> accepted output formats, the first being the default.
TASK_FORMATS = {
    "image": ("png", "webp", "jpeg"),
    "edit": ("png", "webp", "jpeg"),
    "video": ("mp4", "gif", "webp"),
    "mesh": ("glb", "ply", "obj"),
    "audio": ("wav",),
}
OUTPUT_FORMATS = tuple(dict.fromkeys(f for fs in TASK_FORMATS.values() for f in fs))

# Column name -> (type predicate, human description). Columns not listed here are
# carried through to the results untouched.
def _is_string(t: pa.DataType) -> bool:
    return pa.types.is_string(t) or pa.types.is_large_string(t)


def _is_number(t: pa.DataType) -> bool:
    return pa.types.is_integer(t) or pa.types.is_floating(t)


def _is_list_of(t: pa.DataType, item) -> bool:
    return (pa.types.is_list(t) or pa.types.is_large_list(t)) and item(t.value_type)


def _is_lora_list(t: pa.DataType) -> bool:
    def struct(v: pa.DataType) -> bool:
        names = {v.field(i).name: v.field(i).type for i in range(v.num_fields)} if pa.types.is_struct(v) else {}
        return "uri" in names and _is_string(names["uri"]) and ("scale" not in names or _is_number(names["scale"]))

    return _is_list_of(t, struct)


_KINDS = {
    "string": (_is_string, "string"),
    "int": (pa.types.is_integer, "integer"),
    "number": (_is_number, "number"),
    "strings": (lambda t: _is_list_of(t, _is_string), "list<string>"),
    "number_or_numbers": (lambda t: _is_number(t) or _is_list_of(t, _is_number), "number or list<number>"),
    "loras": (_is_lora_list, "list<struct<uri: string, scale: number>>"),
}
MANIFEST_COLUMNS: dict[str, str] = {
    "id": "string",
    "task": "string",
    "model": "string",
    "prompt": "string",
    "negative_prompt": "string",
    "seed": "int",
    "num_inference_steps": "int",
    "guidance_scale": "number",
    "width": "int",
    "height": "int",
    "output_format": "string",
    # edit
    "image_uri": "string",
    "mask_uri": "string",
    "strength": "number",
    "image_guidance_scale": "number",
    # video
    "num_frames": "int",
    "fps": "number",
    # audio
    "audio_length_in_s": "number",
    # class-conditional families
    "class_label": "int",
    # conditioning and adapters
    "control_image_uris": "strings",
    "controlnet_conditioning_scale": "number_or_numbers",
    "loras": "loras",
    "embeddings": "strings",
}
REQUIRED_COLUMNS = ("id",)
# A manifest needs prompts unless its rows can be driven by an input image or a class label.
PROMPT_ALTERNATIVES = ("image_uri", "class_label")
# Parameters a catalog entry may give defaults for.
PARAMETERS = ("negative_prompt", "num_inference_steps", "guidance_scale", "width", "height", "output_format",
              "strength", "image_guidance_scale", "num_frames", "fps", "audio_length_in_s", "controlnet_conditioning_scale")


class ManifestError(ValueError):
    """The manifest as a whole is unusable; raised before any rendering."""


class RowError(ValueError):
    """One row is unusable; it fails with `code: message` and the others go on."""

    def __init__(self, code: str, message: str):
        super().__init__(f"{code}: {message}")
        self.code = code


@dataclass(frozen=True)
class Limits:
    """Bounds on per-row values; rows outside them fail with a specific reason."""

    max_steps: int = 200
    max_pixels: int = 2048 * 2048
    max_prompt_chars: int = 10_000
    max_frames: int = 256
    max_fps: float = 120.0
    max_audio_s: float = 120.0
    max_input_bytes: int = 50 * 1024 * 1024
    max_input_pixels: int = 4096 * 4096


def open_manifest(uri: str) -> pads.Dataset:
    """A pyarrow dataset over a Parquet file or directory, local or on S3."""
    fs, path = filesystem(uri)
    try:
        return pads.dataset(path, filesystem=fs, format="parquet")
    except FileNotFoundError as e:
        raise ManifestError(f"manifest not found: {uri}") from e
    except pa.ArrowInvalid as e:
        raise ManifestError(f"manifest {uri} is not readable Parquet: {e}") from e


def check_schema(schema: pa.Schema) -> None:
    """Raises ManifestError naming every missing or mistyped column."""
    problems = [f"missing required column '{c}'" for c in REQUIRED_COLUMNS if c not in schema.names]
    if "prompt" not in schema.names and not any(c in schema.names for c in PROMPT_ALTERNATIVES):
        problems.append("missing required column 'prompt' (or 'image_uri'/'class_label' for families that take no prompt)")
    for name, kind in MANIFEST_COLUMNS.items():
        if name in schema.names:
            ok, description = _KINDS[kind]
            actual = schema.field(name).type
            if not ok(actual):
                problems.append(f"column '{name}' must be {description}, got {actual}")
    if problems:
        raise ManifestError("manifest schema: " + "; ".join(problems))


def check_ids(ids: pa.ChunkedArray | pa.Array) -> None:
    """Raises ManifestError on null, empty or duplicate ids, listing the duplicates."""
    if ids.null_count:
        raise ManifestError(f"manifest has {ids.null_count} rows with a null 'id'")
    if len(ids) and pc.any(pc.equal(pc.utf8_length(ids), 0)).as_py():
        raise ManifestError("manifest has rows with an empty 'id'")
    counts = pc.value_counts(ids)
    dupes = counts.filter(pc.greater(counts.field("counts"), 1))
    if len(dupes):
        shown = ", ".join(f"{v!r} (x{n})" for v, n in zip(dupes.field("values").to_pylist()[:20], dupes.field("counts").to_pylist()[:20]))
        more = f" and {len(dupes) - 20} more" if len(dupes) > 20 else ""
        raise ManifestError(f"manifest has {len(dupes)} duplicate ids: {shown}{more}")


def derive_seed(row_id: str) -> int:
    """A deterministic non-negative int64 seed for rows that give none."""
    return int.from_bytes(hashlib.sha256(row_id.encode("utf-8")).digest()[:8], "big") & (2**63 - 1)


@dataclass(frozen=True)
class RowParams:
    """A row's validated render parameters, defaults applied."""

    id: str
    task: str
    prompt: str
    negative_prompt: str | None
    seed: int
    num_inference_steps: int | None
    guidance_scale: float | None
    width: int | None
    height: int | None
    output_format: str
    image_uri: str | None = None
    mask_uri: str | None = None
    strength: float | None = None
    image_guidance_scale: float | None = None
    num_frames: int | None = None
    fps: float | None = None
    audio_length_in_s: float | None = None
    class_label: int | None = None
    control_image_uris: tuple[str, ...] = ()
    controlnet_conditioning_scale: float | tuple[float, ...] | None = None
    loras: tuple[tuple[str, float], ...] = ()
    embeddings: tuple[str, ...] = ()


def _bounded(name: str, v: Any, low: float, high: float, code: str, cast: type = float) -> Any:
    if v is None:
        return None
    if not (low <= cast(v) <= high):
        raise RowError(code, f"{name}={v} must be in {low:g}..{high:g}")
    return cast(v)


def resolve_row(row: dict[str, Any], defaults: dict[str, Any], limits: Limits, needs_prompt: bool = True) -> RowParams:
    """Merges catalog defaults under a row's values and validates them (RowError on a bad value)."""

    def value(name: str) -> Any:
        v = row.get(name)
        return defaults.get(name) if v is None else v

    task = row.get("task") or "image"
    if task not in TASKS:
        raise RowError("unknown_task", f"task={task!r}; expected one of {', '.join(TASKS)}")
    prompt = row.get("prompt")
    if needs_prompt and (prompt is None or not str(prompt).strip()):
        raise RowError("missing_prompt", "row has no prompt")
    if prompt is not None and len(prompt) > limits.max_prompt_chars:
        raise RowError("invalid_prompt", f"prompt has {len(prompt)} characters, limit {limits.max_prompt_chars}")
    steps = value("num_inference_steps")
    if steps is not None and not (0 < int(steps) <= limits.max_steps):
        raise RowError("invalid_steps", f"num_inference_steps={steps} must be in 1..{limits.max_steps}")
    guidance = value("guidance_scale")
    if guidance is not None and not (0.0 <= float(guidance) <= 100.0):
        raise RowError("invalid_guidance", f"guidance_scale={guidance} must be in 0..100")
    width, height = value("width"), value("height")
    check_size(width, height, limits)
    formats = TASK_FORMATS[task]
    fmt = str(value("output_format") or formats[0]).lower()
    if fmt == "jpg":
        fmt = "jpeg"
    if fmt not in formats:
        raise RowError("invalid_output_format", f"output_format={fmt!r} for task {task}; expected one of {', '.join(formats)}")
    if task == "edit" and not row.get("image_uri"):
        raise RowError("missing_input", "edit rows need an image_uri")
    if row.get("mask_uri") and not row.get("image_uri"):
        raise RowError("missing_input", "mask_uri needs an image_uri")
    scale = value("controlnet_conditioning_scale")
    if isinstance(scale, (list, tuple)):
        scale = tuple(_bounded("controlnet_conditioning_scale", v, 0.0, 10.0, "invalid_controlnet_scale") for v in scale)
    else:
        scale = _bounded("controlnet_conditioning_scale", scale, 0.0, 10.0, "invalid_controlnet_scale")
    loras = []
    for item in row.get("loras") or []:
        if not item or not item.get("uri"):
            raise RowError("invalid_lora", f"loras entries need a uri, got {item!r}")
        loras.append((str(item["uri"]), _bounded("lora scale", 1.0 if item.get("scale") is None else item["scale"], -10.0, 10.0, "invalid_lora")))
    seed = row.get("seed")
    if seed is not None and not (0 <= int(seed) < 2**63):
        raise RowError("invalid_seed", f"seed={seed} must be in 0..2**63-1")
    return RowParams(
        id=row["id"],
        task=task,
        prompt=prompt,
        negative_prompt=value("negative_prompt"),
        seed=derive_seed(row["id"]) if seed is None else int(seed),
        num_inference_steps=None if steps is None else int(steps),
        guidance_scale=None if guidance is None else float(guidance),
        width=None if width is None else int(width),
        height=None if height is None else int(height),
        output_format=fmt,
        image_uri=row.get("image_uri"),
        mask_uri=row.get("mask_uri"),
        strength=_bounded("strength", value("strength"), 0.0, 1.0, "invalid_strength"),
        image_guidance_scale=_bounded("image_guidance_scale", value("image_guidance_scale"), 0.0, 100.0, "invalid_guidance"),
        num_frames=_bounded("num_frames", value("num_frames"), 1, limits.max_frames, "invalid_frames", int),
        fps=_bounded("fps", value("fps"), 0.1, limits.max_fps, "invalid_fps"),
        audio_length_in_s=_bounded("audio_length_in_s", value("audio_length_in_s"), 0.1, limits.max_audio_s, "invalid_audio_length"),
        class_label=None if row.get("class_label") is None else int(row["class_label"]),
        control_image_uris=tuple(row.get("control_image_uris") or ()),
        controlnet_conditioning_scale=scale,
        loras=tuple(loras),
        embeddings=tuple(row.get("embeddings") or ()),
    )


def check_size(width: int | None, height: int | None, limits: Limits) -> None:
    """Rejects sizes that are not positive multiples of 8 or exceed the pixel limit."""
    for name, v in (("width", width), ("height", height)):
        if v is not None and (int(v) <= 0 or int(v) % 8):
            raise RowError("invalid_size", f"{name}={v} must be a positive multiple of 8")
    if width is not None and height is not None and int(width) * int(height) > limits.max_pixels:
        raise RowError("invalid_size", f"{width}x{height} is {int(width) * int(height)} pixels, limit {limits.max_pixels}")
