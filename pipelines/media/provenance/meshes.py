"""Provenance in meshes: glb, ply and obj, geometry left byte-identical.

glb: glTF ``asset.extras.renderfleet`` (other extras kept), the BIN chunk untouched.
ply: a header line ``comment renderfleet-provenance <json>`` after the ``format`` line.
obj: a first line ``# renderfleet-provenance <json>``.
"""

from __future__ import annotations

import json
import struct
from typing import Any

from pipelines.media.provenance.record import COMMENT_TAG, RECORD_KEY, parse_record, record_json

__all__ = ["EMBEDDERS", "READERS"]


def _glb_parts(data: bytes) -> tuple[dict[str, Any], list[tuple[int, bytes]]]:
    """(JSON chunk parsed, the other chunks as (type, payload)) of a GLB."""
    if len(data) < 20 or data[:4] != b"glTF":
        raise ValueError("not a GLB file (bad magic)")
    version, length = struct.unpack("<II", data[4:12])
    if version != 2:
        raise ValueError(f"unsupported GLB version {version}")
    pos = 12
    tree = None
    others = []
    while pos + 8 <= min(length, len(data)):
        chunk_length, chunk_type = struct.unpack("<II", data[pos : pos + 8])
        payload = data[pos + 8 : pos + 8 + chunk_length]
        if tree is None and chunk_type == 0x4E4F534A:  # "JSON"
            tree = json.loads(payload.decode("utf-8"))
        else:
            others.append((chunk_type, payload))
        pos += 8 + chunk_length
    if not isinstance(tree, dict):
        raise ValueError("GLB has no JSON chunk")
    return tree, others


def embed_glb(data: bytes, record: dict[str, str]) -> bytes:
    tree, others = _glb_parts(data)
    asset = tree.setdefault("asset", {"version": "2.0"})
    extras = asset.get("extras")
    if extras is None:
        extras = {}
    elif not isinstance(extras, dict):
        extras = {"value": extras}  # glTF allows any JSON here; keep it next to ours
    extras[RECORD_KEY] = dict(record)
    asset["extras"] = extras
    json_bytes = json.dumps(tree, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    json_bytes += b" " * (-len(json_bytes) % 4)  # JSON chunk padded with spaces to 4 bytes
    chunks = [(0x4E4F534A, json_bytes), *others]
    body = b"".join(struct.pack("<II", len(payload), ctype) + payload for ctype, payload in chunks)
    return b"glTF" + struct.pack("<II", 2, 12 + len(body)) + body


def read_glb(data: bytes) -> dict[str, str]:
    tree, _others = _glb_parts(data)
    extras = (tree.get("asset") or {}).get("extras")
    record = extras.get(RECORD_KEY) if isinstance(extras, dict) else None
    return {str(k): str(v) for k, v in record.items()} if isinstance(record, dict) else {}


def _ply_header(data: bytes) -> int:
    """Index just past the ``end_header`` line."""
    if not data.startswith(b"ply"):
        raise ValueError("not a PLY file")
    marker = data.find(b"end_header")
    if marker < 0:
        raise ValueError("PLY header has no end_header")
    newline = data.find(b"\n", marker)
    return len(data) if newline < 0 else newline + 1


def embed_ply(data: bytes, record: dict[str, str]) -> bytes:
    header_end = _ply_header(data)
    lines = data[:header_end].splitlines(keepends=True)
    eol = b"\r\n" if lines[0].endswith(b"\r\n") else b"\n"
    prefix = f"comment {COMMENT_TAG} ".encode()
    lines = [line for line in lines if not line.startswith(prefix)]
    at = next((i + 1 for i, line in enumerate(lines) if line.startswith(b"format")), 1)
    lines.insert(at, prefix + record_json(record).encode("ascii") + eol)
    return b"".join(lines) + data[header_end:]


def read_ply(data: bytes) -> dict[str, str]:
    prefix = f"comment {COMMENT_TAG} ".encode()
    for line in data[: _ply_header(data)].splitlines():
        if line.startswith(prefix):
            return parse_record(line[len(prefix) :].strip())
    return {}


def embed_obj(data: bytes, record: dict[str, str]) -> bytes:
    prefix = f"# {COMMENT_TAG} ".encode()
    first_end = data.find(b"\n")
    eol = b"\r\n" if first_end > 0 and data[first_end - 1 : first_end] == b"\r" else b"\n"
    # Drop an earlier record from the leading comment block; the geometry after it is left as is.
    kept, pos = [], 0
    while pos < len(data):
        end = data.find(b"\n", pos)
        end = len(data) if end < 0 else end + 1
        line = data[pos:end]
        if line.strip() and not line.startswith(b"#"):
            break
        if not line.startswith(prefix):
            kept.append(line)
        pos = end
    return prefix + record_json(record).encode("ascii") + eol + b"".join(kept) + data[pos:]


def read_obj(data: bytes) -> dict[str, str]:
    prefix = f"# {COMMENT_TAG} ".encode()
    for line in data.splitlines():
        if line.startswith(prefix):
            return parse_record(line[len(prefix) :].strip())
        if line.strip() and not line.startswith(b"#"):
            break  # the record is in the leading comment block
    return {}


EMBEDDERS = {"glb": embed_glb, "ply": embed_ply, "obj": embed_obj}
READERS = {"glb": read_glb, "ply": read_ply, "obj": read_obj}
