"""The gallery's data: one JSON record per result row, and small JPEG thumbnails under OUT/report-thumbs/.

Thumbnails are content-addressed (named by the output's sha256), so a rerun of `renderfleet report`
generates only the ones it lacks; links are relative to OUT when the output lies under it, so a moved
or downloaded folder still works.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from PIL import Image

from storage.fs import is_remote, join, list_files, read_bytes, write_bytes
from storage.results import absolute_uri, error_code

THUMBS = "report-thumbs"
DATA_FILE = "report-data.js"
THUMB_SIDE = 256
THREADS = 8
_IMAGE_VIDEO_EXT = ("gif", "webp")


def relative_link(out: str, uri: str | None) -> str | None:
    """`uri` relative to OUT when it lies under OUT (a moved folder keeps working), else an absolute link."""
    if not uri:
        return None
    if is_remote(uri) or is_remote(out):
        base = out.rstrip("/") + "/"
        return uri[len(base):] if uri.startswith(base) else uri
    root, path = os.path.abspath(out), os.path.abspath(uri)
    if os.path.commonpath([root, path]) == root:
        return Path(os.path.relpath(path, root)).as_posix()
    return Path(path).as_uri()


def _kind(row: dict[str, Any]) -> str:
    """How a card shows its output: a thumbnail image, a video or audio player, or nothing."""
    task, uri = row.get("task") or "image", (row.get("output_uri") or "").lower()
    if task in ("image", "edit") or task == "video" and uri.endswith(_IMAGE_VIDEO_EXT):
        return "image"
    return task if task in ("video", "audio", "mesh") else "other"


def _thumb_name(row: dict[str, Any]) -> str:
    key = row.get("sha256") or hashlib.sha256(f"{row['id']}\0{row.get('output_uri')}".encode()).hexdigest()
    return f"{key[:32]}.jpg"


def _thumb_bytes(data: bytes, kind: str, ext: str) -> bytes:
    if kind == "mesh":
        import trimesh

        from pipelines.media.mesh import preview_png

        data = preview_png(trimesh.load(io.BytesIO(data), file_type=ext, force="mesh"), THUMB_SIDE)
    image = Image.open(io.BytesIO(data))
    image.seek(0)
    image = image.convert("RGB")
    image.thumbnail((THUMB_SIDE, THUMB_SIDE))
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=82)
    return buf.getvalue()


def ensure_thumb(out: str, row: dict[str, Any], kind: str, have: set[str]) -> str | None:
    """The thumbnail's path relative to OUT, written unless `have` (names already there) holds it; None when
    the output cannot be read."""
    name = _thumb_name(row)
    rel = f"{THUMBS}/{name}"
    target = join(out, rel)
    if name in have:
        return rel
    uri = absolute_uri(out, row["output_uri"])
    try:
        thumb = _thumb_bytes(read_bytes(uri), kind, uri.rsplit(".", 1)[-1].lower())
    except Exception:  # noqa: BLE001 - a missing or broken output shows as a card without a picture
        return None
    write_bytes(target, thumb, content_type="image/jpeg")
    return rel


def _record(out: str, row: dict[str, Any], has_prompt: bool) -> dict[str, Any]:
    kind = _kind(row) if row["status"] == "ok" else "none"
    width, height = row.get("width"), row.get("height")
    record = {
        "id": row["id"], "task": row.get("task") or "image", "status": row["status"], "model": row.get("model") or "",
        "reason": error_code(row.get("error")) if row["status"] == "failed" else (row.get("filter_reason") or "").split(":")[0],
        "error": row.get("error") or row.get("filter_reason") or "", "seed": row.get("seed"),
        "size": f"{width}x{height}" if width and height else "", "kind": kind,
        "href": relative_link(out, absolute_uri(out, row.get("output_uri"))) if row["status"] == "ok" else None, "thumb": None,
    }
    if has_prompt:
        record["prompt"] = row.get("prompt") or ""
    return record


def gallery_records(out: str, rows: list[dict[str, Any]], has_prompt: bool) -> list[dict[str, Any]]:
    """Every result row as a card record (sorted by id), thumbnails generated in a thread pool."""
    records = [_record(out, r, has_prompt) for r in sorted(rows, key=lambda r: r["id"])]
    by_id = {r["id"]: r for r in rows}
    todo = [rec for rec in records if rec["kind"] in ("image", "mesh")]
    have = {uri.rsplit("/", 1)[-1] for uri in list_files(join(out, THUMBS), suffix=".jpg")}  # one listing, not a HEAD each
    with ThreadPoolExecutor(THREADS) as pool:
        thumbs = pool.map(lambda rec: ensure_thumb(out, by_id[rec["id"]], rec["kind"], have), todo)
        for rec, thumb in zip(todo, thumbs):
            rec["thumb"] = thumb
    return records


def write_gallery_data(out: str, records: list[dict[str, Any]]) -> str:
    """OUT/report-data.js: the records as a script, since pages opened from disk cannot fetch JSON."""
    uri = join(out, DATA_FILE)
    body = json.dumps(records, separators=(",", ":"), default=str).replace("</", "<\\/")
    write_bytes(uri, f"window.RF_ROWS={body};\n".encode("utf-8"), content_type="text/javascript")
    return uri
