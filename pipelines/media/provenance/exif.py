"""Exif blocks for webp and jpeg: a human-readable summary where viewers show one, the JSON record in UserComment.

IFD0 ImageDescription ("AI-generated (trainedAlgorithmicMedia) by ...") and Software, and the
Exif IFD's UserComment holding the JSON record; another tool's tags in the block are kept.
"""

from __future__ import annotations

from pipelines.media.provenance.record import GENERATOR, parse_record, record_json

__all__ = ["EXIF_HEADER", "exif_bytes", "record_from_exif"]

EXIF_HEADER = b"Exif\x00\x00"


def exif_bytes(record: dict[str, str], existing: bytes | None = None) -> bytes:
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
    exif_ifd[0x9286] = b"ASCII\x00\x00\x00" + record_json(record).encode("ascii")  # UserComment
    exif[0x8769] = exif_ifd
    data = exif.tobytes()
    return data if data.startswith(EXIF_HEADER) else EXIF_HEADER + data


def record_from_exif(block: bytes | None) -> dict[str, str]:
    """The record from an Exif block's UserComment, or {}."""
    if not block:
        return {}
    from PIL import Image

    exif = Image.Exif()
    try:
        exif.load(block if block.startswith(EXIF_HEADER) else EXIF_HEADER + block)
        comment = exif.get_ifd(0x8769).get(0x9286)
    except Exception:
        return {}
    if isinstance(comment, str):
        comment = comment.encode("utf-8")
    if not isinstance(comment, bytes):
        return {}
    if comment[:8] in (b"ASCII\x00\x00\x00", b"\x00" * 8):
        return parse_record(comment[8:].rstrip(b"\x00"))
    if comment[:8] == b"UNICODE\x00":
        body = comment[8:]
        encoding = "utf-16-be" if body[:1] == b"\x00" else "utf-16-le"
        return parse_record(body.decode(encoding, errors="replace").rstrip("\x00"))
    return {}
