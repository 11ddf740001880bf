"""The manifest: one row per asset to render, from Parquet, CSV or JSON Lines files (or a folder of one kind).

Schema problems stop a job before anything renders; bad values fail only their row.
"""

from __future__ import annotations

import os
import re

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pyarrow.json as pajson

from storage.fs import filesystem, is_remote, list_files
from storage.ledger import MANIFEST, id_report, id_rows
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


# File suffix -> manifest format; files without a known suffix are read as Parquet (as they always were).
FORMATS = {".parquet": "parquet", ".pq": "parquet", ".csv": "csv", ".jsonl": "json", ".ndjson": "json", ".json": "json"}
# Manifest column kind -> the Arrow type CSV and JSON Lines values are read as (so a prompt of digits stays a string).
# List kinds have no CSV form; in JSON Lines they are inferred and then checked like any other column.
_READ_TYPES = {"string": pa.string(), "int": pa.int64(), "number": pa.float64()}


def column_types() -> dict[str, pa.DataType]:
    """The manifest's own column types, for readers that would otherwise guess them from the text."""
    return {name: _READ_TYPES[kind] for name, kind in MANIFEST_COLUMNS.items() if kind in _READ_TYPES}


def _hidden(path: str) -> bool:
    return any(part.startswith(("_", ".")) for part in path.replace("\\", "/").split("/"))


def manifest_files(uri: str) -> tuple[str, list[str]]:
    """The manifest's format and its files: one file, or every visible file of a folder or store prefix.

    A folder must hold one format (Parquet, CSV or JSON Lines); `_`- and `.`-prefixed entries are skipped,
    like Parquet dataset readers do."""
    is_dir = os.path.isdir(uri) if not is_remote(uri) else not uri.rstrip("/").lower().endswith(tuple(FORMATS))
    if not is_dir:
        return FORMATS.get(os.path.splitext(uri)[1].lower(), "parquet"), [uri]
    try:
        files = [f for f in list_files(uri) if not _hidden(f[len(uri.rstrip("/")):])]
    except FileNotFoundError as e:
        raise ManifestError(f"manifest not found: {uri}") from e
    if not files:
        if is_remote(uri):  # a store object without a suffix: read as Parquet, as before
            return "parquet", [uri]
        raise ManifestError(f"manifest not found: {uri} holds no files")
    kinds = {FORMATS.get(os.path.splitext(f)[1].lower(), "parquet") for f in files}
    if len(kinds) > 1:
        raise ManifestError(f"manifest {uri} mixes formats ({', '.join(sorted(kinds))}); keep one format per folder")
    return kinds.pop(), files


def _json_schema(fs: pafs.FileSystem, paths: list[str]) -> pa.Schema:
    """The columns JSON Lines files hold (unified over files), typed as the manifest says where it names them."""
    inferred = pads.dataset(paths, filesystem=fs, format="json")
    found = pa.unify_schemas([f.physical_schema for f in inferred.get_fragments()], promote_options="permissive")
    types = column_types()
    return pa.schema([pa.field(f.name, types.get(f.name, pa.string() if pa.types.is_null(f.type) else f.type))
                      for f in found])


def json_parse_options(fs: pafs.FileSystem, paths: list[str]) -> pajson.ParseOptions:
    """How JSON Lines manifests are parsed: their own columns at the manifest's types, nothing added."""
    return pajson.ParseOptions(explicit_schema=_json_schema(fs, paths), unexpected_field_behavior="infer")


def csv_convert_options() -> pacsv.ConvertOptions:
    """How CSV manifests are read: the manifest's column types; empty cells are nulls except in string columns."""
    return pacsv.ConvertOptions(column_types=column_types())


def _csv_problem(fs: pafs.FileSystem, paths: list[str], message: str) -> str:
    """A CSV conversion error, with the column named as the header names it (Arrow gives its number)."""
    found = re.search(r"'([^']+)'.*In CSV column #(\d+): (Row #\d+): CSV conversion error to (\w+): (.*)", message, re.S)
    if not found:
        return message
    path, number, row, type_, detail = found.groups()
    try:
        header = next(iter(pads.dataset(path, filesystem=fs, format=pads.CsvFileFormat()).schema.names[int(number):]), None)
    except (pa.ArrowInvalid, OSError):
        header = None
    where = f"column '{header}'" if header else f"column #{number}"
    kind = {"int64": "integer", "double": "number"}.get(type_, type_)
    return f"{where} must be {kind}: {row} of {os.path.basename(path)}: {detail.strip()}"


def open_manifest(uri: str) -> pads.Dataset:
    """A pyarrow dataset over a Parquet, CSV or JSON Lines manifest: a file or a folder, local or in a store."""
    fs, path = filesystem(uri)
    try:
        kind, files = manifest_files(uri)
        if kind == "parquet":
            return pads.dataset(path, filesystem=fs, format="parquet")
        paths = [filesystem(f)[1] for f in files]
        if kind == "csv":
            try:
                return pads.dataset(paths, filesystem=fs, format=pads.CsvFileFormat(convert_options=csv_convert_options()))
            except pa.ArrowInvalid as e:
                raise ManifestError(f"manifest {uri}: {_csv_problem(fs, paths, str(e))}") from None
        if kind == "json":
            return pads.dataset(paths, filesystem=fs, format="json", schema=_json_schema(fs, paths))
    except FileNotFoundError as e:
        raise ManifestError(f"manifest not found: {uri}") from e
    except pa.ArrowInvalid as e:
        raise ManifestError(f"manifest {uri} is not readable: {e}") from e


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
    typed = not isinstance(dataset.format, pads.ParquetFileFormat)  # CSV / JSON Lines: read at the manifest's types
    for fragment in dataset.get_fragments():
        schema = fragment.physical_schema
        if typed:  # a JSON column that is null in a file's first rows takes the type it is read as
            schema = pa.schema([dataset.schema.field(f.name) if pa.types.is_null(f.type) and f.name in dataset.schema.names
                                else f for f in schema])
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
    """Raises ManifestError on null, empty or duplicate ids, listing the duplicates (one table; a job
    checks its manifest partition by partition with the same report, see cluster.ledger)."""
    problem = id_report(id_rows(ids, MANIFEST)).problem()
    if problem:
        raise ManifestError(problem)
