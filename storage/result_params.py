"""The call-parameter columns of the results table: each row's resolved render parameters, typed.

The tabled parameters come from storage/params.py's PARAMETERS; values are fitted to their column
types so a failed row's raw value never breaks the results schema (its error says what was wrong).
"""

from __future__ import annotations

import pyarrow as pa

from storage.params import PARAMETERS

LORAS_TYPE = pa.list_(pa.struct([("uri", pa.string()), ("scale", pa.float64())]))
_PARAM_TYPES = {"int": pa.int64(), "number": pa.float64(), "number_or_numbers": pa.list_(pa.float64())}
# The call parameters each row was rendered with (defaults applied), beside the carried columns; the tabled
# ones come from storage/params.py's PARAMETERS (a `number_or_numbers` parameter is always stored as a list).
PARAM_FIELDS: tuple[pa.Field, ...] = (
    pa.field("prompt", pa.string()),
    pa.field("negative_prompt", pa.string()),
    pa.field("output_format", pa.string()),
    pa.field("image_uri", pa.string()),
    pa.field("mask_uri", pa.string()),
    pa.field("control_image_uris", pa.list_(pa.string())),
    pa.field("class_label", pa.int64()),
    pa.field("loras", LORAS_TYPE),
    pa.field("embeddings", pa.list_(pa.string())),
    *(pa.field(p.name, _PARAM_TYPES[p.kind]) for p in PARAMETERS),
)


def _is_int(v: object, bits: int = 64) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and -(2 ** (bits - 1)) <= v < 2 ** (bits - 1)


def _is_number(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and (not isinstance(v, int) or _is_int(v))


def fitted(value: object, type_: pa.DataType) -> object:
    """`value` shaped for a results column of `type_`, or None where it does not fit (never breaks the schema).

    A single number for a list<double> column becomes a one-item list; a bool is never a number.
    """
    if value is None:
        return None
    if pa.types.is_string(type_):
        return value if isinstance(value, str) else None
    if pa.types.is_integer(type_):
        return value if _is_int(value, type_.bit_width) else None
    if pa.types.is_floating(type_):
        return float(value) if _is_number(value) else None
    if pa.types.is_list(type_):
        item = type_.value_type
        if pa.types.is_floating(item) and _is_number(value):
            return [float(value)]
        if not isinstance(value, (list, tuple)):
            return None
        if pa.types.is_struct(item):  # loras: (uri, scale) pairs or {uri, scale} dicts
            pairs = [tuple(v) if isinstance(v, (list, tuple)) and len(v) == 2 else
                     (v.get("uri"), v.get("scale")) if isinstance(v, dict) else (None, None) for v in value]
            return [{"uri": u, "scale": fitted(s, pa.float64())} for u, s in pairs if isinstance(u, str)]
        items = [fitted(v, item) for v in value]
        return None if any(v is None for v in items) else items
    return None


def param_values(source: object) -> dict[str, object]:
    """The PARAM_FIELDS columns from a resolved RowParams (or, for a row that failed before it resolved,
    the raw manifest row's dict), each fitted to its column type."""
    if isinstance(source, dict):
        get = source.get
    else:
        def get(name: str) -> object:
            return getattr(source, name, None)
    return {f.name: fitted(get(f.name), f.type) for f in PARAM_FIELDS}
