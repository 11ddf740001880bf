"""Tiny random-weight diffusers pipelines, built fully offline.

Tests, CI and the embedded demo need real pipelines that load through the
ordinary ``DiffusionPipeline.from_pretrained(dir)`` path without any Hub
access.  This package builds small, deterministic, random-weight pipelines
from configs, saves each with ``save_pretrained(..., safe_serialization=True)``
and writes a ``catalog.yaml`` that the rest of renderfleet reads like any
other model catalog.  Nothing here is special-cased at load time: a built
directory is indistinguishable from a (very small) real checkpoint.

Layout: ``common`` holds the shared builders, one module per family
(``sd``, ``edits``, ``cascades``, ``video``, ``audio``, ``mesh``, ``safety``)
its builders and ``*_MODELS`` specs, ``registry`` lists the families and
``build`` writes models and catalog, ``cached`` finds a current build without importing
any of them (``names`` holds the file names both use).  The factory imports ``pipelines.catalog``;
the catalog never imports the factory.
"""

from __future__ import annotations

import importlib
from typing import Any

# Lazy: `pipelines.tiny.cached` (the default catalog's fast path) must not pull in the factory, which imports
# torch, diffusers and transformers.
_WHERE = {
    "CATALOG_FILE": "names", "MARKER_FILE": "names", "default_catalog_path": "cached",
    "build_tiny_models": "build", "FAMILIES": "registry", "TINY_MODELS": "registry",
    "MODEL_MAX_LENGTH": "common", "SEED": "common", "TinySpec": "common", "build_clip_tokenizer": "common",
    "build_t5_tokenizer": "common", "write_spec": "common",
}


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'pipelines.tiny' has no attribute {name!r}")
    return getattr(importlib.import_module(f"pipelines.tiny.{_WHERE[name]}"), name)


__all__ = [
    "CATALOG_FILE",
    "FAMILIES",
    "MARKER_FILE",
    "MODEL_MAX_LENGTH",
    "SEED",
    "TINY_MODELS",
    "TinySpec",
    "build_clip_tokenizer",
    "build_t5_tokenizer",
    "build_tiny_models",
    "default_catalog_path",
    "write_spec",
]
