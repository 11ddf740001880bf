"""Model weights fingerprint: a sha256 over a model directory's weights and configs, for provenance records.

It lives next to model loading, not with the media code: it reads model directories, never outputs.
Per-file digests are cached in a sidecar in the directory, so multi-GB models are hashed once.
No Ray or torch imports.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

__all__ = ["WEIGHTS_CACHE_NAME", "weights_hash"]

WEIGHTS_CACHE_NAME = ".renderfleet-weights-sha256.json"
"""Sidecar in a model directory caching per-file digests keyed by (path, size, mtime)."""

_RACY_NS = 2_000_000_000
"""A file modified this close to (or after) the cache was written may have changed unseen: rehash it."""


def _is_weights_file(name: str) -> bool:
    """The files a model fingerprint covers: weights and the configs that shape them."""
    return name.endswith(".safetensors") or name == "model_index.json" or name.endswith("config.json")


def _weights_files(root: Path) -> list[tuple[str, Path]]:
    """(relative posix path, path) of the files weights_hash covers, sorted; hidden entries skipped."""
    found = []
    seen_dirs = set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen_dirs:  # a symlink loop
            dirnames[:] = []
            continue
        seen_dirs.add(real)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in filenames:
            if name.startswith(".") or not _is_weights_file(name):
                continue
            path = Path(dirpath) / name
            found.append((path.relative_to(root).as_posix(), path))
    return sorted(found)


def _file_sha256(path: Path) -> str:
    """Hex sha256 of a file's contents (streamed)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(8 << 20):
            digest.update(block)
    return digest.hexdigest()


def _load_cache(path: Path) -> dict[str, Any]:
    """The digest sidecar, or {} when missing, unreadable or of another version."""
    try:
        cache = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    if not isinstance(cache, dict) or cache.get("version") != 1 or not isinstance(cache.get("files"), dict):
        return {}
    return cache


def _save_cache(path: Path, cache: dict[str, Any]) -> bool:
    """Writes the sidecar atomically; False (and no error) when the directory is not writable."""
    try:
        fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    except OSError:
        return False
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(cache, fh, indent=1, sort_keys=True)
        os.replace(tmp, path)
        return True
    except OSError:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        return False


def weights_hash(model_dir: str | Path) -> str:
    """A hex sha256 fingerprint of a model directory's weights and configs.

    Covers every ``*.safetensors``, ``model_index.json`` and ``*config.json`` below
    ``model_dir`` (hidden files and directories skipped): the sha256 over the sorted
    relative paths, each followed by its file's sha256 (the same per-file digest the Hub
    shows for LFS files).  Per-file digests are cached in ``.renderfleet-weights-sha256.json``
    in the directory, keyed by (path, size, mtime_ns), so a multi-GB model is read once;
    a file modified within 2 s of the cache write is rehashed next time (mtime
    granularity).  A read-only directory is simply hashed without caching.
    """
    root = Path(model_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"model directory not found: {root}")
    files = _weights_files(root)
    if not files:
        raise ValueError(f"no *.safetensors / model_index.json / *config.json files under {root}")
    cache_path = root / WEIGHTS_CACHE_NAME
    cache = _load_cache(cache_path)
    cached = cache.get("files", {})
    written_ns = int(cache.get("written_ns", 0)) if cache else 0
    entries: dict[str, list[Any]] = {}
    changed = not cache or set(cached) != {rel for rel, _ in files}
    digest = hashlib.sha256()
    for rel, path in files:
        stat = path.stat()
        entry = cached.get(rel)
        if (
            isinstance(entry, list)
            and len(entry) == 3
            and entry[0] == stat.st_size
            and entry[1] == stat.st_mtime_ns
            and stat.st_mtime_ns + _RACY_NS <= written_ns
        ):
            file_digest = str(entry[2])
        else:
            file_digest = _file_sha256(path)
            changed = True
        entries[rel] = [stat.st_size, stat.st_mtime_ns, file_digest]
        digest.update(rel.encode("utf-8") + b"\x00" + file_digest.encode("ascii") + b"\n")
    result = digest.hexdigest()
    if changed:
        _save_cache(cache_path, {"version": 1, "written_ns": time.time_ns(), "files": entries, "sha256": result})
    return result
