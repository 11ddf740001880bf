"""`renderfleet init DIR`: a starter project (one example manifest per task, an input image, a catalog to edit)."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import yaml

from jobs.exits import UsageError
from pipelines.catalog import renderfleet_home

# task -> (tiny model serving it, example rows)
EXAMPLES: dict[str, tuple[str, list[dict[str, Any]]]] = {
    "image": ("tiny-sd", [{"id": f"image-{i}", "prompt": p} for i, p in
                          enumerate(["a lighthouse at dawn", "a red bicycle in the rain", "a bowl of lemons"])]),
    "edit": ("tiny-sd-img2img", [{"id": "edit-0", "prompt": "the same scene in winter", "image_uri": "inputs/photo.png",
                                  "strength": 0.6}]),
    "video": ("tiny-t2v", [{"id": "video-0", "prompt": "waves rolling onto a beach"}]),
    "mesh": ("tiny-shap-e", [{"id": "mesh-0", "prompt": "a small wooden chair"}]),
    "audio": ("tiny-audioldm", [{"id": "audio-0", "prompt": "rain on a tin roof"}]),
}

CATALOG_HEADER = """\
# A renderfleet model catalog (schema: pipelines/catalog.py, README "Model catalog").
# These entries point at the tiny random-weight models, which renderfleet builds into
# {home}/tiny-models on the first run without --catalog (or: renderfleet models build-tiny DIR).
# Their outputs are noise. To render for real, replace each `source` with a checkpoint:
# a local directory (relative to this file), a Hugging Face Hub id such as
# stable-diffusion-v1-5/stable-diffusion-v1-5, or s3://bucket/prefix; keep the names the
# manifests use in their `model` column, or change both.
"""

README = """\
renderfleet starter project
===========================

One example manifest per task ({manifests}); inputs/photo.png is the edit example's input.
Render one on the tiny random-weight models (built on first use; outputs are noise):

    renderfleet render image.parquet --out out-image
    renderfleet status out-image
    renderfleet report out-image        # out-image/report.html

With your own models: edit catalog.yaml (replace each `source`), then

    renderfleet render image.parquet --out out-image --catalog catalog.yaml

Rerunning the same command resumes. Exit status: 0 all rows final, 3 rows failed
(--max-failed-fraction tolerates some), 2 unusable input, 75 results could not be written.
Manifest columns: README.md "Manifest".
"""


def example_catalog() -> dict[str, Any]:
    """Catalog entries for the models the examples use, sourced from the tiny-model build directory."""
    from pipelines.tiny.registry import TINY_MODELS

    root = renderfleet_home() / "tiny-models"
    models = {}
    for name, _rows in EXAMPLES.values():
        entry = dict(TINY_MODELS[name].entry)
        models[name] = {"source": str(root / entry.pop("source", name)), **entry}
    return {"default_model": "tiny-sd", "models": models}


def _photo() -> bytes:
    """A 64x64 gradient PNG, the edit example's input."""
    from PIL import Image

    img = Image.new("RGB", (64, 64))
    img.putdata([(x * 4, y * 4, 128) for y in range(64) for x in range(64)])
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def init_project(directory: str | Path, force: bool = False) -> list[Path]:
    """Writes the starter files into `directory`; refuses to overwrite any unless `force`. Returns the paths."""
    root = Path(directory)
    files: dict[Path, bytes] = {}
    for task, (model, rows) in EXAMPLES.items():
        table = pa.Table.from_pylist([{"task": task, "model": model, **r} for r in rows])
        sink = io.BytesIO()
        pq.write_table(table, sink)
        files[root / f"{task}.parquet"] = sink.getvalue()
    files[root / "inputs" / "photo.png"] = _photo()
    catalog = CATALOG_HEADER.format(home=renderfleet_home()) + yaml.safe_dump(example_catalog(), sort_keys=False)
    files[root / "catalog.yaml"] = catalog.encode()
    files[root / "README.txt"] = README.format(manifests=", ".join(f"{t}.parquet" for t in EXAMPLES)).encode()
    existing = [str(p) for p in files if p.exists()]
    if existing and not force:
        raise UsageError(f"init: {', '.join(existing)} already exist{'s' if len(existing) == 1 else ''}; "
                         "choose an empty folder or pass --force to overwrite")
    for path, data in files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return list(files)
