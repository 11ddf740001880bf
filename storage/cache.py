"""Node-local, content-keyed cache of model directories kept in a store (s3://, gs://, az://, hf://...).

A model source ``s3://bucket/models/sd-tiny`` is downloaded once per node into a
directory named after a hash of its listing (keys, ETags or modification times, sizes),
so a changed object gives a new directory and an unchanged one is never fetched twice.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import pyarrow.fs as pafs
from filelock import FileLock

from storage import fs

FETCH_LOG = "fetches.jsonl"
MARKER = ".renderfleet-complete"  # written last: a directory without it is not a finished download


def _relative_key(key: str, prefix: str) -> str:
    """The key relative to the prefix, refused if it could land outside the target directory."""
    rel = key[len(prefix):]
    parts = rel.split("/")
    if not rel or rel.startswith("/") or "\\" in rel or any(p in ("", ".", "..") for p in parts) or rel == MARKER:
        raise ValueError(f"refusing to cache object key {key!r}: it does not map to a safe relative path")
    return rel


def _listing(bucket: str, prefix: str) -> list[tuple[str, str, int]]:
    """Sorted ``(relative key, ETag, size)`` of every object under the prefix (directory markers skipped)."""
    pages = fs.s3_client().get_paginator("list_objects_v2").paginate(
        Bucket=bucket, Prefix=prefix, PaginationConfig={"PageSize": fs._PAGE_SIZE}
    )
    return sorted(
        (_relative_key(obj["Key"], prefix), obj["ETag"], obj["Size"])
        for page in pages
        for obj in page.get("Contents", ())
        if not obj["Key"].endswith("/")
    )


def _store_listing(store: pafs.FileSystem, base: str) -> list[tuple[str, str, int]]:
    """Sorted ``(relative key, modification time, size)`` of every object under ``base/`` in a pyarrow filesystem."""
    infos = store.get_file_info(pafs.FileSelector(base, recursive=True, allow_not_found=True))
    return sorted((_relative_key(i.path, base + "/"), str(i.mtime_ns), i.size)
                  for i in infos if i.type == pafs.FileType.File)


def _copy(store: pafs.FileSystem, path: str, dest: Path) -> None:
    with store.open_input_stream(path) as src, open(dest, "wb") as out:
        shutil.copyfileobj(src, out, 1 << 20)


def _source(uri: str) -> tuple[Callable[[], list[tuple[str, str, int]]], Callable[[str, Path], None]]:
    """``(listing, download(rel, dest))`` for a prefix: boto3 on S3, the store's pyarrow filesystem elsewhere."""
    if fs.is_s3(uri):
        bucket, key = fs.split_s3(uri)
        prefix = key.rstrip("/") + "/" if key.strip("/") else ""
        return (lambda: _listing(bucket, prefix),
                lambda rel, dest: fs.s3_client().download_file(bucket, prefix + rel, str(dest)))
    fs.check_uri(uri, "model source")
    store, base = fs.filesystem(uri)
    return lambda: _store_listing(store, base), lambda rel, dest: _copy(store, f"{base}/{rel}", dest)


def fetch_prefix(uri: str, cache_root: str | Path) -> Path:
    """Downloads every object under a store prefix into a local dir keyed by content; returns the dir.

    Downloaded once per node; safe when several processes ask at once (a file lock per key).
    """
    listing, download = _source(uri)
    try:
        objects = listing()
    except Exception as exc:
        if fs._error_code(exc) in fs._NOT_FOUND_CODES:  # no such bucket
            raise FileNotFoundError(f"no objects under {uri}: {exc}") from exc
        raise
    if not objects:
        raise FileNotFoundError(f"no objects under {uri}")
    digest = hashlib.sha256(json.dumps(objects).encode()).hexdigest()[:32]

    root = Path(cache_root).absolute()
    root.mkdir(parents=True, exist_ok=True)
    target = root / digest
    if (target / MARKER).is_file():
        return target

    with FileLock(str(root / f"{digest}.lock")):
        if (target / MARKER).is_file():  # another process finished it while we waited
            return target
        # Only the lock holder writes these: any left over are from a crashed download.
        for stale in root.glob(f".{digest}.*.tmp"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".{digest}.", suffix=".tmp"))
        try:
            for rel, _etag, size in objects:
                dest = tmp / rel
                dest.parent.mkdir(parents=True, exist_ok=True)
                download(rel, dest)
                if dest.stat().st_size != size:
                    raise OSError(f"{fs.join(uri, rel)}: got {dest.stat().st_size} bytes, listed {size}")
            if listing() != objects:
                raise RuntimeError(f"{uri} changed while it was being downloaded; try again")
            (tmp / MARKER).write_text(json.dumps({"uri": uri, "objects": objects}))
            if target.exists():  # an unfinished directory without the marker
                shutil.rmtree(target)
            os.replace(tmp, target)
            with open(root / FETCH_LOG, "a") as log:  # one line per download: how often a node fetched what
                log.write(json.dumps({"uri": uri, "dir": digest, "bytes": sum(o[2] for o in objects),
                                      "pid": os.getpid(), "time": time.time()}) + "\n")
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target
