"""Every tiny family, listed explicitly: adding a family means importing its `*_MODELS` dict here.

The order is the catalog's order (base models first), so it is part of the fixtures' bytes.
"""

from __future__ import annotations

from pipelines.tiny.audio import AUDIO_MODELS
from pipelines.tiny.cascades import CASCADE_MODELS
from pipelines.tiny.common import TinySpec
from pipelines.tiny.edits import EDIT_MODELS
from pipelines.tiny.mesh import MESH_MODELS
from pipelines.tiny.safety import SAFETY_MODELS
from pipelines.tiny.sd import SD_MODELS
from pipelines.tiny.video import VIDEO_MODELS

__all__ = ["FAMILIES", "TINY_MODELS"]

FAMILIES: dict[str, dict[str, TinySpec]] = {
    "sd": SD_MODELS,
    "edits": EDIT_MODELS,
    "cascades": CASCADE_MODELS,
    "video": VIDEO_MODELS,
    "audio": AUDIO_MODELS,
    "mesh": MESH_MODELS,
    "safety": SAFETY_MODELS,
}
"""Family name -> its name -> spec dict."""


def _merge(families: dict[str, dict[str, TinySpec]]) -> dict[str, TinySpec]:
    """One name -> spec dict; a name in two families is an error, since it is a directory and a catalog key."""
    merged: dict[str, TinySpec] = {}
    for family, models in families.items():
        clash = sorted(set(models) & set(merged))
        if clash:
            raise ValueError(f"tiny family {family!r} redefines {clash}")
        merged.update(models)
    return merged


TINY_MODELS: dict[str, TinySpec] = _merge(FAMILIES)
"""Name -> spec for every tiny model of every family; the name is also its directory and catalog key."""
