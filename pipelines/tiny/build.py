"""Writes the tiny models and their catalog.yaml under a root directory.

Builds are idempotent (a marker file written last marks a complete build) and
safe for concurrent callers (each model is built in a temp dir beside its target
and renamed into place; the catalog is written to a temp file and ``os.replace``d).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml

from pipelines.loading import quiet_hf_progress
from pipelines.tiny.common import SEED, write_spec
from pipelines.tiny.registry import TINY_MODELS

from pipelines.tiny.names import CATALOG_FILE, MARKER_FILE

__all__ = ["CATALOG_FILE", "MARKER_FILE", "build_tiny_models"]


def _is_complete(model_dir: Path) -> bool:
    """A model dir counts as built only once its marker (written last) exists."""
    return (model_dir / MARKER_FILE).is_file()


def _read_umask() -> int:
    """The process umask (read by setting and restoring it), to give renamed temp dirs normal permissions."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_UMASK = _read_umask()
"""Read once at import, since reading it briefly changes a process-wide setting."""


def _build_one(root: Path, name: str) -> Path:
    """Builds one model into a temp dir beside its target and renames it into place, so readers never see half a build."""
    target = root / name
    spec = TINY_MODELS[name]
    if spec.write is None or _is_complete(target):
        return target
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", suffix=".tmp", dir=root))
    try:
        write_spec(spec, tmp)  # seeded for identical weights, without disturbing the caller's RNG
        os.chmod(tmp, 0o777 & ~_UMASK)  # mkdtemp makes it 0700; the final dir should be readable like any other.
        (tmp / MARKER_FILE).write_text(json.dumps({"name": name, "seed": SEED}) + "\n", encoding="utf-8")
        if target.exists() and not _is_complete(target):
            # A leftover from a crashed build (no marker): replace it.
            shutil.rmtree(target, ignore_errors=True)
        try:
            os.rename(tmp, target)
        except OSError:
            # Another caller finished first (target now a non-empty dir); keep theirs if complete.
            if not _is_complete(target):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _catalog(names: list[str]) -> dict[str, Any]:
    """The catalog mapping for the built models; paths are relative to the catalog's directory."""
    pipelines = [n for n in names if TINY_MODELS[n].entry.get("kind", "pipeline") == "pipeline"]
    if not pipelines:
        raise ValueError(f"a catalog needs at least one pipeline; {', '.join(names)} has none (add e.g. tiny-sd)")
    default = "tiny-sd" if "tiny-sd" in pipelines else pipelines[0]
    catalog: dict[str, Any] = {"default_model": default}
    if "tiny-safety-checker" in names:
        catalog["safety"] = {"checker": "tiny-safety-checker"}
    catalog["models"] = {name: {"source": name, **TINY_MODELS[name].entry} for name in names}
    return catalog


def _write_atomic(path: Path, text: str) -> None:
    """Writes via a temp file and os.replace, so concurrent readers see the old or new file, never a partial one."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes it 0600; readers may be other users.
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def build_tiny_models(root: str | Path, names: Iterable[str] | None = None) -> Path:
    """Builds each named tiny model (all when None) under root/<name>/ and writes root/catalog.yaml; returns the catalog path."""
    quiet_hf_progress()
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    selected = list(dict.fromkeys(TINY_MODELS if names is None else names))
    unknown = [n for n in selected if n not in TINY_MODELS]
    if unknown:
        raise KeyError(f"unknown tiny model(s) {unknown}; known: {sorted(TINY_MODELS)}")
    # Entries over another model's directory need that model, and cascades their stages.
    for name in selected:  # grows while iterating: dependencies of dependencies too
        entry = TINY_MODELS[name].entry
        for dep in [entry.get("source")] + list(entry.get("stages", [])) + list(entry.get("controlnets", [])):
            if dep in TINY_MODELS and dep not in selected:
                selected.append(dep)
    if not selected:
        raise ValueError("no tiny models selected")
    for name in selected:
        _build_one(root, name)
    catalog_path = root / CATALOG_FILE
    _write_atomic(catalog_path, yaml.safe_dump(_catalog(selected), sort_keys=False, default_flow_style=None))
    return catalog_path

