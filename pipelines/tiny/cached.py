"""The default tiny catalog without importing the factory: once a complete build is stamped with the hash of
the factory's own sources, runs without --catalog find it in milliseconds instead of importing torch and
diffusers (seconds of every such command's start-up) just to learn it is there."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from pipelines.catalog import renderfleet_home
from pipelines.tiny.names import CATALOG_FILE, MARKER_FILE, STAMP_FILE



def factory_hash() -> str:
    """Changes whenever any module of the factory changes, so an older build is never taken for a current one."""
    digest = hashlib.sha256()
    for source in sorted(Path(__file__).parent.glob("*.py")):
        digest.update(source.name.encode() + b"\0" + source.read_bytes())
    return digest.hexdigest()


def default_catalog_path() -> str:
    """The tiny random-weight catalog, built into renderfleet's cache on first use (what runs without --catalog get)."""
    root = renderfleet_home() / "tiny-models"
    if is_current(root):
        return str(root / CATALOG_FILE)
    from pipelines.tiny.build import build_tiny_models

    path = build_tiny_models(root)
    models = sorted(p.parent.name for p in root.glob(f"*/{MARKER_FILE}"))  # entries without weights have none
    tmp = root / f"{STAMP_FILE}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps({"factory": factory_hash(), "models": models}))
    os.replace(tmp, root / STAMP_FILE)  # concurrent builders: readers see one whole stamp or none
    return str(path)


def is_current(root: Path) -> bool:
    """A complete build by this very factory: stamped with its hash, every stamped model still marked complete."""
    try:
        built = json.loads((root / STAMP_FILE).read_text())
        return (built["factory"] == factory_hash() and (root / CATALOG_FILE).is_file()
                and all((root / name / MARKER_FILE).is_file() for name in built["models"]))
    except (OSError, ValueError, KeyError, TypeError):
        return False
