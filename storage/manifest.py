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

OUTPUT_FORMATS = ("png", "webp", "jpeg")

# Column name -> (type predicate, human description). Columns not listed here are
# carried through to the results untouched.
_KINDS = {
    "string": (lambda t: pa.types.is_string(t) or pa.types.is_large_string(t), "string"),
    "int": (pa.types.is_integer, "integer"),
    "number": (lambda t: pa.types.is_integer(t) or pa.types.is_floating(t), "number"),
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
}
REQUIRED_COLUMNS = ("id", "prompt")
# Parameters a catalog entry may give defaults for.
PARAMETERS = ("negative_prompt", "num_inference_steps", "guidance_scale", "width", "height", "output_format")


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


def resolve_row(row: dict[str, Any], defaults: dict[str, Any], limits: Limits) -> RowParams:
    """Merges catalog defaults under a row's values and validates them (RowError on a bad value)."""

    def value(name: str) -> Any:
        v = row.get(name)
        return defaults.get(name) if v is None else v

    prompt = row.get("prompt")
    if prompt is None or not str(prompt).strip():
        raise RowError("missing_prompt", "row has no prompt")
    if len(prompt) > limits.max_prompt_chars:
        raise RowError("invalid_prompt", f"prompt has {len(prompt)} characters, limit {limits.max_prompt_chars}")
    steps = value("num_inference_steps")
    if steps is not None and not (0 < int(steps) <= limits.max_steps):
        raise RowError("invalid_steps", f"num_inference_steps={steps} must be in 1..{limits.max_steps}")
    guidance = value("guidance_scale")
    if guidance is not None and not (0.0 <= float(guidance) <= 100.0):
        raise RowError("invalid_guidance", f"guidance_scale={guidance} must be in 0..100")
    width, height = value("width"), value("height")
    check_size(width, height, limits)
    fmt = str(value("output_format") or "png").lower()
    if fmt == "jpg":
        fmt = "jpeg"
    if fmt not in OUTPUT_FORMATS:
        raise RowError("invalid_output_format", f"output_format={fmt!r}; expected one of {', '.join(OUTPUT_FORMATS)}")
    seed = row.get("seed")
    if seed is not None and not (0 <= int(seed) < 2**63):
        raise RowError("invalid_seed", f"seed={seed} must be in 0..2**63-1")
    return RowParams(
        id=row["id"],
        task=row.get("task") or "image",
        prompt=prompt,
        negative_prompt=value("negative_prompt"),
        seed=derive_seed(row["id"]) if seed is None else int(seed),
        num_inference_steps=None if steps is None else int(steps),
        guidance_scale=None if guidance is None else float(guidance),
        width=None if width is None else int(width),
        height=None if height is None else int(height),
        output_format=fmt,
    )


def check_size(width: int | None, height: int | None, limits: Limits) -> None:
    """Rejects sizes that are not positive multiples of 8 or exceed the pixel limit."""
    for name, v in (("width", width), ("height", height)):
        if v is not None and (int(v) <= 0 or int(v) % 8):
            raise RowError("invalid_size", f"{name}={v} must be a positive multiple of 8")
    if width is not None and height is not None and int(width) * int(height) > limits.max_pixels:
        raise RowError("invalid_size", f"{width}x{height} is {int(width) * int(height)} pixels, limit {limits.max_pixels}")
