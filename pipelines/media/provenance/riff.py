"""RIFF chunk lists, shared by WebP (raster) and WAV: read them, and write a file back from them."""

from __future__ import annotations

import struct

__all__ = ["riff_chunks", "riff_file"]


def riff_chunks(data: bytes, form: bytes) -> list[tuple[bytes, bytes]]:
    """(fourcc, payload) of each chunk of a RIFF file of the given form type."""
    if len(data) < 12 or data[:4] != b"RIFF" or data[8:12] != form:
        raise ValueError(f"not a RIFF {form.decode().strip()} file")
    chunks = []
    pos = 12
    while pos + 8 <= len(data):
        fourcc = data[pos : pos + 4]
        (size,) = struct.unpack("<I", data[pos + 4 : pos + 8])
        payload = data[pos + 8 : pos + 8 + size]
        if len(payload) != size:
            raise ValueError(f"truncated RIFF chunk {fourcc!r}")
        chunks.append((fourcc, payload))
        pos += 8 + size + (size & 1)
    return chunks


def riff_file(form: bytes, chunks: list[tuple[bytes, bytes]]) -> bytes:
    """A RIFF file of the given form type from (fourcc, payload) chunks, each padded to even length."""
    body = b"".join(
        fourcc + struct.pack("<I", len(payload)) + payload + (b"\x00" if len(payload) & 1 else b"")
        for fourcc, payload in chunks
    )
    return b"RIFF" + struct.pack("<I", 4 + len(body)) + form + body
