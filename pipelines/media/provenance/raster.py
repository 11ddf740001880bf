"""Provenance in still images: png, webp and jpeg, each with the record, XMP and (webp, jpeg) Exif.

png: one ``tEXt`` chunk per key (``iTXt`` when a value is not Latin-1), a ``renderfleet`` ``iTXt``
chunk with the JSON record and XMP (``iTXt`` ``XML:com.adobe.xmp``), inserted before the first
``IDAT``.  webp: RIFF ``EXIF`` and ``XMP `` chunks, a ``VP8X`` header added or its flags set.
jpeg: ``APP1`` Exif and ``APP1`` XMP segments after ``SOI``/``APP0``.  Image data is left
byte-identical in all three.
"""

from __future__ import annotations

import json
import struct
import zlib

from pipelines.media.provenance.exif import EXIF_HEADER, exif_bytes, record_from_exif
from pipelines.media.provenance.record import RECORD_KEY, parse_record
from pipelines.media.provenance.riff import riff_chunks, riff_file
from pipelines.media.provenance.xmp import record_from_xmp, xmp_packet

__all__ = ["EMBEDDERS", "READERS"]

_XMP_JPEG_HEADER = b"http://ns.adobe.com/xap/1.0/\x00"
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_XMP_KEYWORD = "XML:com.adobe.xmp"


def _png_chunks(data: bytes) -> list[tuple[bytes, bytes, bytes]]:
    """(type, payload, raw chunk bytes) for each chunk; ValueError when this is not a PNG."""
    if not data.startswith(_PNG_SIGNATURE):
        raise ValueError("not a PNG file (bad signature)")
    chunks = []
    pos = len(_PNG_SIGNATURE)
    while pos + 12 <= len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        ctype = data[pos + 4 : pos + 8]
        end = pos + 12 + length
        if end > len(data):
            raise ValueError(f"truncated PNG chunk {ctype!r}")
        chunks.append((ctype, data[pos + 8 : pos + 8 + length], data[pos:end]))
        pos = end
        if ctype == b"IEND":
            break
    if not chunks or chunks[0][0] != b"IHDR":
        raise ValueError("not a PNG file (no IHDR)")
    return chunks


def _png_chunk(ctype: bytes, payload: bytes) -> bytes:
    """One PNG chunk: length, type, payload and CRC."""
    return struct.pack(">I", len(payload)) + ctype + payload + struct.pack(">I", zlib.crc32(ctype + payload))


def _png_text(ctype: bytes, payload: bytes) -> tuple[str, str] | None:
    """(keyword, text) of a tEXt/zTXt/iTXt chunk, or None when it is not one (or is unreadable)."""
    try:
        if ctype == b"tEXt":
            key, _, text = payload.partition(b"\x00")
            return key.decode("latin-1"), text.decode("latin-1")
        if ctype == b"zTXt":
            key, _, rest = payload.partition(b"\x00")
            return key.decode("latin-1"), zlib.decompress(rest[1:]).decode("latin-1")
        if ctype == b"iTXt":
            key, _, rest = payload.partition(b"\x00")
            compressed, rest = rest[0], rest[2:]
            _lang, _, rest = rest.partition(b"\x00")
            _translated, _, text = rest.partition(b"\x00")
            if compressed:
                text = zlib.decompress(text)
            return key.decode("latin-1"), text.decode("utf-8")
    except (ValueError, IndexError, zlib.error):
        return None
    return None


def embed_png(data: bytes, record: dict[str, str]) -> bytes:
    from PIL.PngImagePlugin import PngInfo

    chunks = _png_chunks(data)
    texts = {}
    for ctype, payload, _raw in chunks:
        text = _png_text(ctype, payload)
        if text is not None:
            texts.setdefault(text[0], text[1])
    replaced = set(record) | {RECORD_KEY, _PNG_XMP_KEYWORD} | set(parse_record(texts.get(RECORD_KEY, "")))

    info = PngInfo()
    for key, value in record.items():
        info.add_text(key, value)  # tEXt, or iTXt when the value is not Latin-1
    info.add_itxt(RECORD_KEY, json.dumps(record, ensure_ascii=False, separators=(",", ":")))
    info.add_itxt(_PNG_XMP_KEYWORD, xmp_packet(record, texts.get(_PNG_XMP_KEYWORD, "").encode("utf-8")).decode())
    new_chunks = b"".join(_png_chunk(ctype, payload) for ctype, payload, *_ in info.chunks)

    out = [_PNG_SIGNATURE]
    inserted = False
    for ctype, payload, raw in chunks:
        text = _png_text(ctype, payload)
        if text is not None and text[0] in replaced:
            continue  # an earlier renderfleet record: replaced below
        if ctype in (b"IDAT", b"IEND") and not inserted:
            out.append(new_chunks)  # before the image data, where every reader sees it
            inserted = True
        out.append(raw)
    return b"".join(out)


def read_png(data: bytes) -> dict[str, str]:
    xmp = None
    for ctype, payload, _raw in _png_chunks(data):
        text = _png_text(ctype, payload)
        if text is None:
            continue
        if text[0] == RECORD_KEY:
            return parse_record(text[1])
        if text[0] == _PNG_XMP_KEYWORD:
            xmp = text[1]
    return record_from_xmp(xmp)


def _webp_canvas(fourcc: bytes, payload: bytes) -> tuple[int, int, bool]:
    """(width, height, has alpha) from a simple-format WebP's VP8 / VP8L bitstream header."""
    if fourcc == b"VP8 " and len(payload) >= 10 and payload[3:6] == b"\x9d\x01\x2a":
        width, height = struct.unpack("<HH", payload[6:10])
        return width & 0x3FFF, height & 0x3FFF, False
    if fourcc == b"VP8L" and len(payload) >= 5 and payload[0] == 0x2F:
        (bits,) = struct.unpack("<I", payload[1:5])
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1, bool((bits >> 28) & 1)
    raise ValueError(f"unrecognised WebP bitstream chunk {fourcc!r}")


def embed_webp(data: bytes, record: dict[str, str]) -> bytes:
    chunks = riff_chunks(data, b"WEBP")
    if not chunks:
        raise ValueError("empty WebP file")
    existing = dict((fourcc, payload) for fourcc, payload in chunks if fourcc in (b"EXIF", b"XMP "))
    others = [(fourcc, payload) for fourcc, payload in chunks if fourcc not in (b"EXIF", b"XMP ")]
    if others[0][0] == b"VP8X":
        header = bytearray(others[0][1])
        others = others[1:]
    else:  # simple format (one VP8/VP8L chunk): the extended header metadata chunks need
        width, height, alpha = _webp_canvas(*others[0])
        header = bytearray(10)
        header[0] = 0x10 if alpha else 0
        header[4:7] = (width - 1).to_bytes(3, "little")
        header[7:10] = (height - 1).to_bytes(3, "little")
    header[0] |= 0x08 | 0x04  # EXIF and XMP present
    exif = exif_bytes(record, existing.get(b"EXIF"))[len(EXIF_HEADER) :]  # WebP stores bare TIFF
    xmp = xmp_packet(record, existing.get(b"XMP "))
    return riff_file(b"WEBP", [(b"VP8X", bytes(header)), *others, (b"EXIF", exif), (b"XMP ", xmp)])


def read_webp(data: bytes) -> dict[str, str]:
    chunks = dict(riff_chunks(data, b"WEBP"))
    return record_from_xmp(chunks.get(b"XMP ")) or record_from_exif(chunks.get(b"EXIF"))


def _jpeg_segments(data: bytes) -> tuple[list[tuple[int, bytes]], bytes]:
    """The marker segments before SOS as (marker, raw segment bytes), and the rest (SOS onwards)."""
    if data[:2] != b"\xff\xd8":
        raise ValueError("not a JPEG file (no SOI marker)")
    segments = []
    pos = 2
    while pos + 4 <= len(data):
        if data[pos] != 0xFF:
            raise ValueError(f"corrupt JPEG: expected a marker at byte {pos}")
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker == 0xDA or marker == 0xD9:  # SOS / EOI: the rest is image data
            return segments, data[pos:]
        if 0xD0 <= marker <= 0xD7 or marker == 0x01:
            segments.append((marker, data[pos : pos + 2]))
            pos += 2
            continue
        (length,) = struct.unpack(">H", data[pos + 2 : pos + 4])
        segments.append((marker, data[pos : pos + 2 + length]))
        pos += 2 + length
    raise ValueError("corrupt JPEG: no SOS marker")


def _app1(payload: bytes, what: str) -> bytes:
    """A JPEG APP1 segment; ValueError when the payload exceeds a segment."""
    if len(payload) + 2 > 0xFFFF:
        raise ValueError(f"{what} is {len(payload)} bytes, over a JPEG segment's 65533: shorten the record")
    return b"\xff\xe1" + struct.pack(">H", len(payload) + 2) + payload


def embed_jpeg(data: bytes, record: dict[str, str]) -> bytes:
    segments, rest = _jpeg_segments(data)
    old_exif = old_xmp = None
    kept = []
    for marker, raw in segments:
        if marker == 0xE1 and raw[4:10] == EXIF_HEADER:
            old_exif = old_exif or raw[4:]
            continue
        if marker == 0xE1 and raw[4:].startswith(_XMP_JPEG_HEADER):
            old_xmp = old_xmp or raw[4 + len(_XMP_JPEG_HEADER) :]
            continue
        kept.append((marker, raw))
    exif = _app1(exif_bytes(record, old_exif), "the Exif block")
    xmp = _app1(_XMP_JPEG_HEADER + xmp_packet(record, old_xmp), "the XMP packet")
    at = 1 if kept and kept[0][0] == 0xE0 else 0  # JFIF's APP0 must stay first
    raws = [raw for _marker, raw in kept]
    return b"\xff\xd8" + b"".join(raws[:at]) + exif + xmp + b"".join(raws[at:]) + rest


def read_jpeg(data: bytes) -> dict[str, str]:
    segments, _rest = _jpeg_segments(data)
    exif = xmp = None
    for marker, raw in segments:
        if marker == 0xE1 and raw[4:10] == EXIF_HEADER and exif is None:
            exif = raw[4:]
        elif marker == 0xE1 and raw[4:].startswith(_XMP_JPEG_HEADER) and xmp is None:
            xmp = raw[4 + len(_XMP_JPEG_HEADER) :]
    return record_from_xmp(xmp) or record_from_exif(exif)


EMBEDDERS = {"png": embed_png, "webp": embed_webp, "jpeg": embed_jpeg}
READERS = {"png": read_png, "webp": read_webp, "jpeg": read_jpeg}
