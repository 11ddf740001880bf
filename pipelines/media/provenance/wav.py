"""Provenance in audio: a WAV ``LIST``/``INFO`` chunk before ``data``.

``INAM`` (row id), ``ISFT`` (generator) and ``ICMT`` (the JSON record); other INFO fields are kept,
samples left byte-identical.
"""

from __future__ import annotations

import struct

from pipelines.media.provenance.record import GENERATOR, parse_record, record_json
from pipelines.media.provenance.riff import riff_chunks, riff_file

__all__ = ["EMBEDDERS", "READERS"]


def _info_items(payload: bytes) -> list[tuple[bytes, bytes]]:
    """(id, zstring payload) subchunks of a LIST/INFO payload (after the 'INFO' form type)."""
    items = []
    pos = 4
    while pos + 8 <= len(payload):
        fourcc = payload[pos : pos + 4]
        (size,) = struct.unpack("<I", payload[pos + 4 : pos + 8])
        items.append((fourcc, payload[pos + 8 : pos + 8 + size]))
        pos += 8 + size + (size & 1)
    return items


def _info_text(value: str) -> bytes:
    """A NUL-terminated UTF-8 INFO value."""
    return value.replace("\x00", "\ufffd").encode("utf-8") + b"\x00"


def embed_wav(data: bytes, record: dict[str, str]) -> bytes:
    chunks = riff_chunks(data, b"WAVE")
    ours = {
        b"INAM": _info_text(record.get("row_id", GENERATOR)),
        b"ISFT": _info_text(record.get("generator", GENERATOR)),
        b"ICMT": _info_text(record_json(record)),
    }
    items: list[tuple[bytes, bytes]] = []
    for fourcc, payload in chunks:
        if fourcc == b"LIST" and payload[:4] == b"INFO":
            items += [(k, v) for k, v in _info_items(payload) if k not in ours]  # keep others' fields
    items += list(ours.items())
    info = b"INFO" + b"".join(
        k + struct.pack("<I", len(v)) + v + (b"\x00" if len(v) & 1 else b"") for k, v in items
    )
    out = []
    inserted = False
    for fourcc, payload in chunks:
        if fourcc == b"LIST" and payload[:4] == b"INFO":
            continue
        if fourcc == b"data" and not inserted:
            out.append((b"LIST", info))
            inserted = True
        out.append((fourcc, payload))
    if not inserted:
        out.append((b"LIST", info))
    return riff_file(b"WAVE", out)


def read_wav(data: bytes) -> dict[str, str]:
    for fourcc, payload in riff_chunks(data, b"WAVE"):
        if fourcc == b"LIST" and payload[:4] == b"INFO":
            for key, value in _info_items(payload):
                if key == b"ICMT":
                    return parse_record(value.rstrip(b"\x00"))
    return {}


EMBEDDERS = {"wav": embed_wav}
READERS = {"wav": read_wav}
