"""Provenance metadata: what made an output, written in each format's own standard place.

:func:`provenance_record` builds a flat ``{str: str}`` record (generator, model and its
weights' sha256, seed, steps, guidance, job and row ids, and the prompt's sha256, or the
prompt itself only on request); :func:`embed_metadata` writes it into the file bytes
without touching pixels, samples or geometry, and :func:`read_metadata` reads it back
(``renderfleet verify``).  Where each format keeps it:

========  ==================================================================================
png       one ``tEXt`` chunk per key (``iTXt`` when a value is not Latin-1), a ``renderfleet``
          ``iTXt`` chunk with the JSON record, and XMP (``iTXt`` ``XML:com.adobe.xmp``);
          inserted before the first ``IDAT``, which is left byte-identical
webp      RIFF ``EXIF`` and ``XMP `` chunks (a ``VP8X`` header is added or its flags set);
          the ``VP8``/``VP8L``/``ALPH``/``ANMF`` chunks are left byte-identical
jpeg      an ``APP1`` Exif segment (IFD0 ImageDescription + Software, Exif IFD UserComment
          with the JSON) and an ``APP1`` XMP segment, inserted after ``SOI``/``APP0``;
          the entropy-coded data is left byte-identical
gif       a comment extension ``renderfleet-provenance <json>`` after the global colour table
mp4       MP4 ``mdta`` metadata (``moov/udta/meta`` keys + ilst): one tag per key plus
          ``comment`` = JSON, by the bundled ffmpeg remuxing with ``-c copy`` (no re-encode)
glb       glTF ``asset.extras.renderfleet`` (other extras kept), the BIN chunk byte-identical
ply       a header line ``comment renderfleet-provenance <json>`` after the ``format`` line
obj       a first line ``# renderfleet-provenance <json>``
wav       a ``LIST``/``INFO`` chunk before ``data``: ``INAM`` (row id), ``ISFT`` (generator),
          ``ICMT`` (JSON); other INFO fields kept
========  ==================================================================================

XMP (png, webp, jpeg) also carries IPTC's ``Iptc4xmpExt:DigitalSourceType`` =
``trainedAlgorithmicMedia`` and ``xmp:CreatorTool``, the fields AI-disclosure readers
look for.  Re-embedding replaces an earlier renderfleet record rather than adding a
second one.  For signed Content Credentials see :mod:`pipelines.credentials` (embed
first, then sign: a signature binds the final bytes).

:func:`weights_hash` fingerprints a model directory (safetensors + configs), caching
per-file digests in a sidecar so multi-GB models are hashed once.  No Ray imports.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import struct
import subprocess
import tempfile
import time
import xml.etree.ElementTree as ElementTree
import zlib
from pathlib import Path
from typing import Any
from xml.sax.saxutils import escape

__all__ = [
    "GENERATOR",
    "METADATA_FORMATS",
    "TRAINED_ALGORITHMIC_MEDIA",
    "embed_metadata",
    "provenance_record",
    "read_metadata",
    "weights_hash",
]

GENERATOR = "renderfleet"

METADATA_FORMATS = ("png", "webp", "jpeg", "gif", "mp4", "glb", "ply", "obj", "wav")
"""Formats embed_metadata / read_metadata handle (``jpg`` is accepted as an alias of ``jpeg``)."""

TRAINED_ALGORITHMIC_MEDIA = "http://cv.iptc.org/newscodes/digitalsourcetype/trainedAlgorithmicMedia"
"""IPTC digital source type for media created by a trained model."""

RECORD_KEY = "renderfleet"
"""PNG text keyword (and glTF ``asset.extras`` key) holding the JSON record."""

COMMENT_TAG = "renderfleet-provenance"
"""Prefix of the comment carrying the JSON record in GIF, PLY and OBJ."""

XMP_NAMESPACE = "urn:renderfleet:provenance:1.0/"
"""XMP namespace of renderfleet's properties (prefix ``renderfleet``)."""

FFMPEG_TIMEOUT_S = 300.0
"""Upper bound for one metadata remux (stream copy: normally well under a second)."""

WEIGHTS_CACHE_NAME = ".renderfleet-weights-sha256.json"
"""Sidecar in a model directory caching per-file digests keyed by (path, size, mtime)."""

_RACY_NS = 2_000_000_000
"""A file modified this close to (or after) the cache was written may have changed unseen: rehash it."""

_KEY_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_]{0,78}$")
_XMP_NS = {
    "x": "adobe:ns:meta/",
    "rdf": "http://www.w3.org/1999/02/22-rdf-syntax-ns#",
    "xmp": "http://ns.adobe.com/xap/1.0/",
    "Iptc4xmpExt": "http://iptc.org/std/Iptc4xmpExt/2008-02-29/",
    "renderfleet": XMP_NAMESPACE,
}
_XMP_JPEG_HEADER = b"http://ns.adobe.com/xap/1.0/\x00"
_EXIF_HEADER = b"Exif\x00\x00"
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_XMP_KEYWORD = "XML:com.adobe.xmp"
_INVALID_XML_CHARS = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff\ufffe\uffff]")


# ---------------------------------------------------------------------------
# The record
# ---------------------------------------------------------------------------


def _sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def provenance_record(
    *,
    version: str,
    model: str,
    model_hash: str,
    seed: int,
    steps: int | None,
    guidance: float | None,
    job_id: str,
    row_id: str,
    prompt: str | None,
    include_prompt: bool = False,
) -> dict[str, str]:
    """The flat string record embedded in outputs.

    Keys, in order: ``generator`` ("renderfleet <version>"), ``model``, ``model_sha256``,
    ``seed``, ``steps``, ``guidance``, ``job_id``, ``row_id`` and then either ``prompt``
    (only with ``include_prompt``) or ``prompt_sha256`` (the privacy default: the hex
    sha256 of the UTF-8 prompt, which lets the owner of a prompt match it without the
    file disclosing it).  ``steps``/``guidance``/prompt keys are left out when None.
    """
    record = {
        "generator": f"{GENERATOR} {version}".strip(),
        "model": str(model),
        "model_sha256": str(model_hash),
        "seed": str(int(seed)),
    }
    if steps is not None:
        record["steps"] = str(int(steps))
    if guidance is not None:
        record["guidance"] = repr(float(guidance))
    record["job_id"] = str(job_id)
    record["row_id"] = str(row_id)
    if prompt is not None:
        if include_prompt:
            record["prompt"] = str(prompt)
        else:
            record["prompt_sha256"] = _sha256_text(str(prompt))
    return record


def _checked_record(record: dict[str, str]) -> dict[str, str]:
    """The record, after checking that keys are portable tag names and values are strings."""
    if not isinstance(record, dict) or not record:
        raise ValueError("provenance record must be a non-empty dict of str -> str")
    for key, value in record.items():
        if not isinstance(key, str) or not _KEY_RE.match(key):
            raise ValueError(
                f"record key {key!r} is not a portable tag name (a letter, then letters, digits or _; at most 79)"
            )
        if not isinstance(value, str):
            raise TypeError(f"record value for {key!r} must be a str, got {type(value).__name__}")
    return dict(record)


def _record_json(record: dict[str, str]) -> str:
    """Compact ASCII JSON (non-ASCII and control characters escaped), safe for any text field."""
    return json.dumps(record, ensure_ascii=True, separators=(",", ":"))


def _parse_record(text: str | bytes) -> dict[str, str]:
    """A record parsed from JSON, or {} when it is not a JSON object of strings."""
    try:
        value = json.loads(text)
    except (ValueError, UnicodeDecodeError):
        return {}
    if not isinstance(value, dict):
        return {}
    return {str(k): v if isinstance(v, str) else json.dumps(v) for k, v in value.items()}


def _normalise_format(fmt: str) -> str:
    key = fmt.lower().lstrip(".")
    key = {"jpg": "jpeg"}.get(key, key)
    if key not in METADATA_FORMATS:
        raise ValueError(f"unknown format {fmt!r}; expected one of {', '.join(METADATA_FORMATS)}")
    return key


def embed_metadata(data: bytes, fmt: str, record: dict[str, str]) -> bytes:
    """``data`` with ``record`` written into the format's own metadata place (see the module docs).

    Pixels, samples and geometry are left byte-identical (mp4: the streams are copied by
    ffmpeg, packets unchanged).  Embedding again replaces the earlier renderfleet record.
    Raises ValueError for an unknown format or a file that is not the format it claims.
    """
    key = _normalise_format(fmt)
    return _EMBEDDERS[key](bytes(data), _checked_record(record))


def read_metadata(data: bytes, fmt: str) -> dict[str, str]:
    """The record embed_metadata wrote, or {} when the file carries none."""
    key = _normalise_format(fmt)
    return _READERS[key](bytes(data))


# ---------------------------------------------------------------------------
# XMP and Exif (shared by png, webp, jpeg)
# ---------------------------------------------------------------------------


def _xml_text(value: str) -> str:
    return escape(_INVALID_XML_CHARS.sub("\ufffd", value))


def _xmp_description(record: dict[str, str], standard_fields: bool) -> str:
    """renderfleet's rdf:Description: the record per key and as JSON, plus CreatorTool/DigitalSourceType."""
    lines = [
        '  <rdf:Description rdf:about=""',
        f'    xmlns:xmp="{_XMP_NS["xmp"]}"',
        f'    xmlns:Iptc4xmpExt="{_XMP_NS["Iptc4xmpExt"]}"',
        f'    xmlns:renderfleet="{XMP_NAMESPACE}">',
    ]
    if standard_fields:
        lines.append(f"   <xmp:CreatorTool>{_xml_text(record.get('generator', GENERATOR))}</xmp:CreatorTool>")
        lines.append(f"   <Iptc4xmpExt:DigitalSourceType>{TRAINED_ALGORITHMIC_MEDIA}</Iptc4xmpExt:DigitalSourceType>")
    for key, value in record.items():
        lines.append(f"   <renderfleet:{key}>{_xml_text(value)}</renderfleet:{key}>")
    lines.append(f"   <renderfleet:record>{_xml_text(_record_json(record))}</renderfleet:record>")
    lines.append("  </rdf:Description>")
    return "\n".join(lines)


_OUR_DESCRIPTION_RE = re.compile(
    r"\s*<rdf:Description\b[^>]*xmlns:renderfleet=\"" + re.escape(XMP_NAMESPACE) + r"\".*?</rdf:Description>",
    re.DOTALL,
)


def _xmp_packet(record: dict[str, str], existing: bytes | None = None) -> bytes:
    """An XMP packet with renderfleet's description; merged into ``existing`` (another tool's XMP) when given."""
    if existing:
        text = existing.decode("utf-8", errors="replace")
        text = _OUR_DESCRIPTION_RE.sub("", text)
        close = text.rfind("</rdf:RDF>")
        if close >= 0 and "<rdf:Description" in text:
            # Another tool's packet: add our description, without repeating properties it already sets.
            standard = "CreatorTool>" not in text and "DigitalSourceType>" not in text
            merged = text[:close].rstrip() + "\n" + _xmp_description(record, standard) + "\n " + text[close:]
            return merged.encode("utf-8")
    packet = "\n".join(
        [
            '<?xpacket begin="\ufeff" id="W5M0MpCehiHzreSzNTczkc9d"?>',
            f'<x:xmpmeta xmlns:x="{_XMP_NS["x"]}" x:xmptk="{GENERATOR}">',
            f' <rdf:RDF xmlns:rdf="{_XMP_NS["rdf"]}">',
            _xmp_description(record, True),
            " </rdf:RDF>",
            "</x:xmpmeta>",
            '<?xpacket end="w"?>',
        ]
    )
    return packet.encode("utf-8")


def _record_from_xmp(packet: bytes | str | None) -> dict[str, str]:
    """The record from an XMP packet's renderfleet:record property, or {}."""
    if not packet:
        return {}
    text = packet.decode("utf-8", errors="replace") if isinstance(packet, bytes) else packet
    start = text.find("<x:xmpmeta")
    end = text.rfind("</x:xmpmeta>")
    if start < 0 or end < 0:
        return {}
    try:
        root = ElementTree.fromstring(text[start : end + len("</x:xmpmeta>")])
    except ElementTree.ParseError:
        return {}
    node = root.find(".//{%s}record" % XMP_NAMESPACE)
    return _parse_record(node.text or "") if node is not None else {}


def _exif_bytes(record: dict[str, str], existing: bytes | None = None) -> bytes:
    """A TIFF/Exif block (``Exif\\0\\0`` prefixed): ImageDescription, Software, and UserComment = JSON."""
    from PIL import Image

    exif = Image.Exif()
    if existing:
        try:
            exif.load(existing)
        except Exception:  # A corrupt foreign Exif block: replace it rather than fail the render.
            exif = Image.Exif()
    generator = record.get("generator", GENERATOR)
    summary = f"AI-generated (trainedAlgorithmicMedia) by {generator}"
    if record.get("model"):
        summary += f" with model {record['model']}"
    if record.get("seed"):
        summary += f", seed {record['seed']}"
    exif[0x010E] = summary.encode("ascii", "backslashreplace").decode("ascii")  # ImageDescription
    exif[0x0131] = generator.encode("ascii", "backslashreplace").decode("ascii")  # Software
    exif_ifd = exif.get_ifd(0x8769)
    exif_ifd[0x9286] = b"ASCII\x00\x00\x00" + _record_json(record).encode("ascii")  # UserComment
    exif[0x8769] = exif_ifd
    data = exif.tobytes()
    return data if data.startswith(_EXIF_HEADER) else _EXIF_HEADER + data


def _record_from_exif(block: bytes | None) -> dict[str, str]:
    """The record from an Exif block's UserComment, or {}."""
    if not block:
        return {}
    from PIL import Image

    exif = Image.Exif()
    try:
        exif.load(block if block.startswith(_EXIF_HEADER) else _EXIF_HEADER + block)
        comment = exif.get_ifd(0x8769).get(0x9286)
    except Exception:
        return {}
    if isinstance(comment, str):
        comment = comment.encode("utf-8")
    if not isinstance(comment, bytes):
        return {}
    if comment[:8] in (b"ASCII\x00\x00\x00", b"\x00" * 8):
        return _parse_record(comment[8:].rstrip(b"\x00"))
    if comment[:8] == b"UNICODE\x00":
        body = comment[8:]
        encoding = "utf-16-be" if body[:1] == b"\x00" else "utf-16-le"
        return _parse_record(body.decode(encoding, errors="replace").rstrip("\x00"))
    return {}


# ---------------------------------------------------------------------------
# PNG
# ---------------------------------------------------------------------------


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


def _embed_png(data: bytes, record: dict[str, str]) -> bytes:
    from PIL.PngImagePlugin import PngInfo

    chunks = _png_chunks(data)
    texts = {}
    for ctype, payload, _raw in chunks:
        text = _png_text(ctype, payload)
        if text is not None:
            texts.setdefault(text[0], text[1])
    replaced = set(record) | {RECORD_KEY, _PNG_XMP_KEYWORD} | set(_parse_record(texts.get(RECORD_KEY, "")))

    info = PngInfo()
    for key, value in record.items():
        info.add_text(key, value)  # tEXt, or iTXt when the value is not Latin-1
    info.add_itxt(RECORD_KEY, json.dumps(record, ensure_ascii=False, separators=(",", ":")))
    info.add_itxt(_PNG_XMP_KEYWORD, _xmp_packet(record, texts.get(_PNG_XMP_KEYWORD, "").encode("utf-8")).decode())
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


def _read_png(data: bytes) -> dict[str, str]:
    xmp = None
    for ctype, payload, _raw in _png_chunks(data):
        text = _png_text(ctype, payload)
        if text is None:
            continue
        if text[0] == RECORD_KEY:
            return _parse_record(text[1])
        if text[0] == _PNG_XMP_KEYWORD:
            xmp = text[1]
    return _record_from_xmp(xmp)


# ---------------------------------------------------------------------------
# WebP (RIFF)
# ---------------------------------------------------------------------------


def _riff_chunks(data: bytes, form: bytes) -> list[tuple[bytes, bytes]]:
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


def _riff(form: bytes, chunks: list[tuple[bytes, bytes]]) -> bytes:
    body = b"".join(
        fourcc + struct.pack("<I", len(payload)) + payload + (b"\x00" if len(payload) & 1 else b"")
        for fourcc, payload in chunks
    )
    return b"RIFF" + struct.pack("<I", 4 + len(body)) + form + body


def _webp_canvas(fourcc: bytes, payload: bytes) -> tuple[int, int, bool]:
    """(width, height, has alpha) from a simple-format WebP's VP8 / VP8L bitstream header."""
    if fourcc == b"VP8 " and len(payload) >= 10 and payload[3:6] == b"\x9d\x01\x2a":
        width, height = struct.unpack("<HH", payload[6:10])
        return width & 0x3FFF, height & 0x3FFF, False
    if fourcc == b"VP8L" and len(payload) >= 5 and payload[0] == 0x2F:
        (bits,) = struct.unpack("<I", payload[1:5])
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1, bool((bits >> 28) & 1)
    raise ValueError(f"unrecognised WebP bitstream chunk {fourcc!r}")


def _embed_webp(data: bytes, record: dict[str, str]) -> bytes:
    chunks = _riff_chunks(data, b"WEBP")
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
    exif = _exif_bytes(record, existing.get(b"EXIF"))[len(_EXIF_HEADER) :]  # WebP stores bare TIFF
    xmp = _xmp_packet(record, existing.get(b"XMP "))
    return _riff(b"WEBP", [(b"VP8X", bytes(header)), *others, (b"EXIF", exif), (b"XMP ", xmp)])


def _read_webp(data: bytes) -> dict[str, str]:
    chunks = dict(_riff_chunks(data, b"WEBP"))
    return _record_from_xmp(chunks.get(b"XMP ")) or _record_from_exif(chunks.get(b"EXIF"))


# ---------------------------------------------------------------------------
# JPEG
# ---------------------------------------------------------------------------


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
    if len(payload) + 2 > 0xFFFF:
        raise ValueError(f"{what} is {len(payload)} bytes, over a JPEG segment's 65533: shorten the record")
    return b"\xff\xe1" + struct.pack(">H", len(payload) + 2) + payload


def _embed_jpeg(data: bytes, record: dict[str, str]) -> bytes:
    segments, rest = _jpeg_segments(data)
    old_exif = old_xmp = None
    kept = []
    for marker, raw in segments:
        if marker == 0xE1 and raw[4:10] == _EXIF_HEADER:
            old_exif = old_exif or raw[4:]
            continue
        if marker == 0xE1 and raw[4:].startswith(_XMP_JPEG_HEADER):
            old_xmp = old_xmp or raw[4 + len(_XMP_JPEG_HEADER) :]
            continue
        kept.append((marker, raw))
    exif = _app1(_exif_bytes(record, old_exif), "the Exif block")
    xmp = _app1(_XMP_JPEG_HEADER + _xmp_packet(record, old_xmp), "the XMP packet")
    at = 1 if kept and kept[0][0] == 0xE0 else 0  # JFIF's APP0 must stay first
    raws = [raw for _marker, raw in kept]
    return b"\xff\xd8" + b"".join(raws[:at]) + exif + xmp + b"".join(raws[at:]) + rest


def _read_jpeg(data: bytes) -> dict[str, str]:
    segments, _rest = _jpeg_segments(data)
    exif = xmp = None
    for marker, raw in segments:
        if marker == 0xE1 and raw[4:10] == _EXIF_HEADER and exif is None:
            exif = raw[4:]
        elif marker == 0xE1 and raw[4:].startswith(_XMP_JPEG_HEADER) and xmp is None:
            xmp = raw[4 + len(_XMP_JPEG_HEADER) :]
    return _record_from_xmp(xmp) or _record_from_exif(exif)


# ---------------------------------------------------------------------------
# GIF
# ---------------------------------------------------------------------------


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
    out = bytearray()
    pos = start + 2
    while pos < end and data[pos]:
        out += data[pos + 1 : pos + 1 + data[pos]]
        pos += 1 + data[pos]
    return bytes(out)


def _embed_gif(data: bytes, record: dict[str, str]) -> bytes:
    header_end, blocks = _gif_blocks(data)
    text = f"{COMMENT_TAG} {_record_json(record)}".encode("ascii")
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


def _read_gif(data: bytes) -> dict[str, str]:
    _header_end, blocks = _gif_blocks(data)
    prefix = COMMENT_TAG.encode() + b" "
    for start, end, label in blocks:
        if label == 0xFE:
            text = _gif_comment_text(data, start, end)
            if text.startswith(prefix):
                return _parse_record(text[len(prefix) :])
    return {}


# ---------------------------------------------------------------------------
# MP4
# ---------------------------------------------------------------------------


def _ffmpeg_value(value: str) -> str:
    """A metadata value safe for argv (no NUL)."""
    return value.replace("\x00", "\ufffd")


def _embed_mp4(data: bytes, record: dict[str, str]) -> bytes:
    import imageio_ffmpeg

    if len(data) < 8 or data[4:8] not in (b"ftyp", b"moov", b"free", b"mdat", b"wide", b"skip"):
        raise ValueError("not an MP4 file")
    metadata = []
    for key, value in record.items():
        metadata += ["-metadata", f"{key}={_ffmpeg_value(value)}"]
    metadata += ["-metadata", f"comment={_record_json(record)}"]
    for key in _read_mp4(data):
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


def _read_mp4(data: bytes) -> dict[str, str]:
    tags = _mp4_mdta(data)
    return _parse_record(tags["comment"]) if "comment" in tags else {}


# ---------------------------------------------------------------------------
# Meshes
# ---------------------------------------------------------------------------


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


def _embed_glb(data: bytes, record: dict[str, str]) -> bytes:
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


def _read_glb(data: bytes) -> dict[str, str]:
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


def _embed_ply(data: bytes, record: dict[str, str]) -> bytes:
    header_end = _ply_header(data)
    lines = data[:header_end].splitlines(keepends=True)
    eol = b"\r\n" if lines[0].endswith(b"\r\n") else b"\n"
    prefix = f"comment {COMMENT_TAG} ".encode()
    lines = [line for line in lines if not line.startswith(prefix)]
    at = next((i + 1 for i, line in enumerate(lines) if line.startswith(b"format")), 1)
    lines.insert(at, prefix + _record_json(record).encode("ascii") + eol)
    return b"".join(lines) + data[header_end:]


def _read_ply(data: bytes) -> dict[str, str]:
    prefix = f"comment {COMMENT_TAG} ".encode()
    for line in data[: _ply_header(data)].splitlines():
        if line.startswith(prefix):
            return _parse_record(line[len(prefix) :].strip())
    return {}


def _embed_obj(data: bytes, record: dict[str, str]) -> bytes:
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
    return prefix + _record_json(record).encode("ascii") + eol + b"".join(kept) + data[pos:]


def _read_obj(data: bytes) -> dict[str, str]:
    prefix = f"# {COMMENT_TAG} ".encode()
    for line in data.splitlines():
        if line.startswith(prefix):
            return _parse_record(line[len(prefix) :].strip())
        if line.strip() and not line.startswith(b"#"):
            break  # the record is in the leading comment block
    return {}


# ---------------------------------------------------------------------------
# WAV
# ---------------------------------------------------------------------------


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
    return value.replace("\x00", "\ufffd").encode("utf-8") + b"\x00"


def _embed_wav(data: bytes, record: dict[str, str]) -> bytes:
    chunks = _riff_chunks(data, b"WAVE")
    ours = {
        b"INAM": _info_text(record.get("row_id", GENERATOR)),
        b"ISFT": _info_text(record.get("generator", GENERATOR)),
        b"ICMT": _info_text(_record_json(record)),
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
    return _riff(b"WAVE", out)


def _read_wav(data: bytes) -> dict[str, str]:
    for fourcc, payload in _riff_chunks(data, b"WAVE"):
        if fourcc == b"LIST" and payload[:4] == b"INFO":
            for key, value in _info_items(payload):
                if key == b"ICMT":
                    return _parse_record(value.rstrip(b"\x00"))
    return {}


_EMBEDDERS = {
    "png": _embed_png,
    "webp": _embed_webp,
    "jpeg": _embed_jpeg,
    "gif": _embed_gif,
    "mp4": _embed_mp4,
    "glb": _embed_glb,
    "ply": _embed_ply,
    "obj": _embed_obj,
    "wav": _embed_wav,
}
_READERS = {
    "png": _read_png,
    "webp": _read_webp,
    "jpeg": _read_jpeg,
    "gif": _read_gif,
    "mp4": _read_mp4,
    "glb": _read_glb,
    "ply": _read_ply,
    "obj": _read_obj,
    "wav": _read_wav,
}


# ---------------------------------------------------------------------------
# Model weights fingerprint
# ---------------------------------------------------------------------------


def _is_weights_file(name: str) -> bool:
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
