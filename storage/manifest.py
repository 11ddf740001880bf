"""The manifest: one Parquet row per asset to render.

Schema problems stop a job before anything renders; bad values fail only their row.
"""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads

from storage.fs import filesystem
from storage.params import PARAMETERS

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


# Column kind -> (type predicate, human description).
_KINDS = {
    "string": (_is_string, "string"),
    "int": (pa.types.is_integer, "integer"),
    "number": (_is_number, "number"),
    "strings": (lambda t: _is_list_of(t, _is_string), "list<string>"),
    "number_or_numbers": (lambda t: _is_number(t) or _is_list_of(t, _is_number), "number or list<number>"),
    "loras": (_is_lora_list, "list<struct<uri: string, scale: number>>"),
}
# Column name -> kind. Columns not listed here are carried through to the results untouched.
MANIFEST_COLUMNS: dict[str, str] = {
    "id": "string",
    "task": "string",
    "model": "string",
    "prompt": "string",
    "negative_prompt": "string",
    "seed": "int",
    "width": "int",
    "height": "int",
    "output_format": "string",
    # input assets
    "image_uri": "string",
    "mask_uri": "string",
    "control_image_uris": "strings",
    # class-conditional families
    "class_label": "int",
    # adapters
    "loras": "loras",
    "embeddings": "strings",
    # per-call parameters, from the one table
    **{p.name: p.kind for p in PARAMETERS},
}
REQUIRED_COLUMNS = ("id",)
# A manifest needs prompts unless its rows can be driven by an input image or a class label.
PROMPT_ALTERNATIVES = ("image_uri", "class_label")


class ManifestError(ValueError):
    """The manifest as a whole is unusable; raised before any rendering."""


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


def check_files(dataset: pads.Dataset) -> None:
    """Checks every file of a directory manifest, not just the first, and that they agree on column types."""
    seen: dict[str, tuple[pa.DataType, str]] = {}
    problems = []
    for fragment in dataset.get_fragments():
        schema = fragment.physical_schema
        try:
            check_schema(schema)
        except ManifestError as e:
            problems.append(f"{fragment.path}: {str(e).removeprefix('manifest schema: ')}")
        for f in schema:
            first = seen.setdefault(f.name, (f.type, fragment.path))
            if not _same_kind(first[0], f.type):
                problems.append(f"column '{f.name}' is {first[0]} in {first[1]} but {f.type} in {fragment.path}")
    if problems:
        shown = "; ".join(problems[:20]) + (f"; and {len(problems) - 20} more" if len(problems) > 20 else "")
        raise ManifestError("manifest schema: " + shown)


def _same_kind(a: pa.DataType, b: pa.DataType) -> bool:
    """Types that read together: equal, or both integers, or both floating point, or both strings."""
    return a == b or any(kind(a) and kind(b) for kind in (pa.types.is_integer, pa.types.is_floating, _is_string))


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
