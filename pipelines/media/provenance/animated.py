"""Provenance in animations and video: gif and mp4.

gif: a comment extension ``renderfleet-provenance <json>`` after the global colour table.
mp4: ``mdta`` metadata (``moov/udta/meta`` keys + ilst), one tag per key plus ``comment`` = JSON,
written by the bundled ffmpeg remuxing with ``-c copy``: packets unchanged, no re-encode.
"""

from __future__ import annotations

import os
import struct
import subprocess
import tempfile

from pipelines.media.provenance.record import COMMENT_TAG, parse_record, record_json

__all__ = ["EMBEDDERS", "FFMPEG_TIMEOUT_S", "READERS"]

FFMPEG_TIMEOUT_S = 300.0
"""Upper bound for one metadata remux (stream copy: normally well under a second)."""


def _gif_sub_blocks_end(data: bytes, pos: int) -> int:
    """Index just past the sub-block sequence starting at pos (ended by a zero-length block)."""
    while True:
        if pos >= len(data):
            raise ValueError("truncated GIF data sub-blocks")
        size = data[pos]
        pos += 1 + size
        if size == 0:
            return pos


def _gif_blocks(data: bytes) -> tuple[int, list[tuple[int, int, int]]]:
    """(end of header + global colour table, [(start, end, label)...]) for the blocks up to the trailer.

    ``label`` is the extension label (0xFE comment, 0xF9 graphic control, 0xFF application)
    or 0x2C for an image, 0x3B for the trailer.
    """
    if data[:6] not in (b"GIF87a", b"GIF89a"):
        raise ValueError("not a GIF file")
    flags = data[10]
    pos = 13 + (3 * (2 << (flags & 7)) if flags & 0x80 else 0)
    header_end = pos
    blocks = []
    while pos < len(data):
        start = pos
        introducer = data[pos]
        if introducer == 0x3B:
            blocks.append((start, pos + 1, 0x3B))
            break
        if introducer == 0x21:
            label = data[pos + 1]
            pos = _gif_sub_blocks_end(data, pos + 2)
            blocks.append((start, pos, label))
        elif introducer == 0x2C:
            image_flags = data[pos + 9]
            pos += 10 + (3 * (2 << (image_flags & 7)) if image_flags & 0x80 else 0)
            pos = _gif_sub_blocks_end(data, pos + 1)  # +1: LZW minimum code size
            blocks.append((start, pos, 0x2C))
        else:
            raise ValueError(f"corrupt GIF: unexpected block 0x{introducer:02x} at byte {pos}")
    return header_end, blocks


def _gif_comment_text(data: bytes, start: int, end: int) -> bytes:
    """The concatenated sub-blocks of a comment extension."""
    out = bytearray()
    pos = start + 2
    while pos < end and data[pos]:
        out += data[pos + 1 : pos + 1 + data[pos]]
        pos += 1 + data[pos]
    return bytes(out)


def embed_gif(data: bytes, record: dict[str, str]) -> bytes:
    header_end, blocks = _gif_blocks(data)
    text = f"{COMMENT_TAG} {record_json(record)}".encode("ascii")
    comment = bytearray(b"\x21\xfe")
    for i in range(0, len(text), 255):
        piece = text[i : i + 255]
        comment += bytes([len(piece)]) + piece
    comment += b"\x00"
    if data[:6] == b"GIF87a":  # extensions are GIF89a
        data = b"GIF89a" + data[6:]
    out = [data[:header_end], bytes(comment)]
    pos = header_end
    for start, end, label in blocks:
        if label == 0xFE and _gif_comment_text(data, start, end).startswith(COMMENT_TAG.encode() + b" "):
            out.append(data[pos:start])  # drop an earlier renderfleet comment
            pos = end
    out.append(data[pos:])
    return b"".join(out)


def read_gif(data: bytes) -> dict[str, str]:
    _header_end, blocks = _gif_blocks(data)
    prefix = COMMENT_TAG.encode() + b" "
    for start, end, label in blocks:
        if label == 0xFE:
            text = _gif_comment_text(data, start, end)
            if text.startswith(prefix):
                return parse_record(text[len(prefix) :])
    return {}


def _ffmpeg_value(value: str) -> str:
    """A metadata value safe for argv (no NUL)."""
    return value.replace("\x00", "\ufffd")


def embed_mp4(data: bytes, record: dict[str, str]) -> bytes:
    import imageio_ffmpeg

    if len(data) < 8 or data[4:8] not in (b"ftyp", b"moov", b"free", b"mdat", b"wide", b"skip"):
        raise ValueError("not an MP4 file")
    metadata = []
    for key, value in record.items():
        metadata += ["-metadata", f"{key}={_ffmpeg_value(value)}"]
    metadata += ["-metadata", f"comment={record_json(record)}"]
    for key in read_mp4(data):
        if key not in record:
            metadata += ["-metadata", f"{key}="]  # an earlier record's key this one lacks: remove it
    # With use_metadata_tags ffmpeg would also copy the brand fields into mdta tags: clear them.
    metadata += ["-metadata", "major_brand=", "-metadata", "minor_version=", "-metadata", "compatible_brands="]
    with tempfile.TemporaryDirectory(prefix="rf-meta-") as tmp:
        src = os.path.join(tmp, "in.mp4")
        dst = os.path.join(tmp, "out.mp4")
        with open(src, "wb") as fh:
            fh.write(data)
        command = [
            imageio_ffmpeg.get_ffmpeg_exe(),
            "-hide_banner", "-nostdin", "-loglevel", "error", "-y",
            "-i", src, "-map", "0", "-c", "copy", "-map_metadata", "0",
            *metadata,
            # mdta keys (arbitrary names) rather than the fixed iTunes atoms; moov first for streaming;
            # bitexact: no muxer version tag, so equal inputs give equal bytes.
            "-movflags", "+faststart+use_metadata_tags", "-fflags", "+bitexact",
            "-f", "mp4", dst,
        ]  # fmt: skip
        try:
            proc = subprocess.run(command, capture_output=True, timeout=FFMPEG_TIMEOUT_S, check=False)
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"ffmpeg did not finish remuxing the mp4 in {FFMPEG_TIMEOUT_S:.0f} s") from None
        if proc.returncode != 0:
            detail = proc.stderr.decode("utf-8", errors="replace").strip()[-2000:]
            raise RuntimeError(f"ffmpeg failed (exit {proc.returncode}) writing mp4 metadata: {detail}")
        with open(dst, "rb") as fh:
            return fh.read()


def _mp4_boxes(data: bytes, start: int, end: int) -> list[tuple[bytes, int, int]]:
    """(type, payload start, payload end) for the boxes between start and end."""
    boxes = []
    pos = start
    while pos + 8 <= end:
        size, btype = struct.unpack(">I4s", data[pos : pos + 8])
        header = 8
        if size == 1:
            if pos + 16 > end:
                break
            (size,) = struct.unpack(">Q", data[pos + 8 : pos + 16])
            header = 16
        elif size == 0:
            size = end - pos
        if size < header or pos + size > end:
            break
        boxes.append((btype, pos + header, pos + size))
        pos += size
    return boxes


def _mp4_mdta(data: bytes) -> dict[str, str]:
    """All ``mdta`` key/value string tags in moov/udta/meta (or moov/meta)."""
    tags: dict[str, str] = {}
    for btype, start, end in _mp4_boxes(data, 0, len(data)):
        if btype != b"moov":
            continue
        metas = []
        for child, cstart, cend in _mp4_boxes(data, start, end):
            if child == b"meta":
                metas.append((cstart, cend))
            elif child == b"udta":
                metas += [(s, e) for t, s, e in _mp4_boxes(data, cstart, cend) if t == b"meta"]
        for mstart, mend in metas:
            inner = _mp4_boxes(data, mstart + 4, mend)  # meta is a full box: skip version/flags
            if not inner or inner[0][0] != b"hdlr":
                inner = _mp4_boxes(data, mstart, mend)  # QuickTime-style meta without version/flags
            keys: list[str] = []
            for t, s, e in inner:
                if t == b"keys":
                    (count,) = struct.unpack(">I", data[s + 4 : s + 8])
                    pos = s + 8
                    for _ in range(count):
                        (ksize,) = struct.unpack(">I", data[pos : pos + 4])
                        keys.append(data[pos + 8 : pos + ksize].decode("utf-8", errors="replace"))
                        pos += ksize
            for t, s, e in inner:
                if t != b"ilst":
                    continue
                for item, istart, iend in _mp4_boxes(data, s, e):
                    index = int.from_bytes(item, "big")
                    if not 1 <= index <= len(keys):
                        continue
                    for dtype, dstart, dend in _mp4_boxes(data, istart, iend):
                        if dtype == b"data" and dend - dstart >= 8:
                            tags[keys[index - 1]] = data[dstart + 8 : dend].decode("utf-8", errors="replace")
    return tags


def read_mp4(data: bytes) -> dict[str, str]:
    tags = _mp4_mdta(data)
    return parse_record(tags["comment"]) if "comment" in tags else {}


EMBEDDERS = {"gif": embed_gif, "mp4": embed_mp4}
READERS = {"gif": read_gif, "mp4": read_mp4}
