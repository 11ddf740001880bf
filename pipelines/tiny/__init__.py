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
``build`` writes models and catalog.  The factory imports ``pipelines.catalog``;
the catalog never imports the factory.
"""

from __future__ import annotations

from pipelines.tiny.build import CATALOG_FILE, MARKER_FILE, build_tiny_models, default_catalog_path
from pipelines.tiny.common import (
    MODEL_MAX_LENGTH,
    SEED,
    TinySpec,
    build_clip_tokenizer,
    build_t5_tokenizer,
    write_spec,
)
from pipelines.tiny.registry import FAMILIES, TINY_MODELS

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
