"""Typed settings sections from YAML mappings: the checks every catalog section shares (unknown keys, value
types), with errors that name the field. Apart from pipelines/catalog.py, which defines the sections."""

from __future__ import annotations

from typing import Any


class CatalogError(ValueError):
    """The catalog file is malformed; the message says where."""


def check_keys(data: Any, allowed: set[str], where: str) -> None:
    """Refuses anything but a mapping whose keys are all `allowed`."""
    if not isinstance(data, dict):
        raise CatalogError(f"{where}: expected a mapping, got {type(data).__name__}")
    unknown = sorted(set(map(str, data)) - allowed)
    if unknown:
        raise CatalogError(f"{where}: unknown keys {', '.join(unknown)} (allowed: {', '.join(sorted(allowed))})")


def typed_settings(cls: type, data: Any, where: str) -> Any:
    """Builds a settings dataclass from a mapping, checking keys and value types."""
    if data is None:
        return cls()
    fields = cls.__dataclass_fields__
    check_keys(data, set(fields), where)
    defaults = cls()
    values = {}
    for k, v in data.items():
        want = type(getattr(defaults, k))
        if want is float and isinstance(v, int) and not isinstance(v, bool):
            v = float(v)
        if not isinstance(v, want) or (want is int and isinstance(v, bool)):
            raise CatalogError(f"{where}.{k}: expected {want.__name__}, got {v!r}")
        values[k] = v
    return cls(**values)
