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
second one.  For signed Content Credentials see :mod:`pipelines.media.credentials` (embed
first, then sign: a signature binds the final bytes).

This module dispatches by format; the work is split by concern: :mod:`.record` (the record and
its JSON), :mod:`.xmp` and :mod:`.exif` (shared by png, webp, jpeg), :mod:`.riff` (webp, wav),
and one module per format family: :mod:`.raster` (png, webp, jpeg), :mod:`.animated` (gif, mp4),
:mod:`.meshes` (glb, ply, obj), :mod:`.wav`.  Which formats take metadata is the ``metadata``
column of :mod:`pipelines.media.formats`.  The model weights fingerprint is
:mod:`pipelines.fingerprint`.  No Ray or torch imports.
"""

from __future__ import annotations

from collections.abc import Callable

from pipelines.media.formats import FORMATS, format_for_extension
from pipelines.media.provenance import animated, meshes, raster, wav
from pipelines.media.provenance.record import (
    COMMENT_TAG,
    GENERATOR,
    RECORD_KEY,
    TRAINED_ALGORITHMIC_MEDIA,
    checked_record,
    provenance_record,
)
from pipelines.media.provenance.xmp import XMP_NAMESPACE

__all__ = [
    "COMMENT_TAG",
    "GENERATOR",
    "METADATA_FORMATS",
    "RECORD_KEY",
    "TRAINED_ALGORITHMIC_MEDIA",
    "XMP_NAMESPACE",
    "embed_metadata",
    "provenance_record",
    "read_metadata",
]

_EMBEDDERS: dict[str, Callable[[bytes, dict[str, str]], bytes]] = {
    **raster.EMBEDDERS, **animated.EMBEDDERS, **meshes.EMBEDDERS, **wav.EMBEDDERS,
}
_READERS: dict[str, Callable[[bytes], dict[str, str]]] = {
    **raster.READERS, **animated.READERS, **meshes.READERS, **wav.READERS,
}

METADATA_FORMATS = tuple(name for name, fmt in FORMATS.items() if fmt.metadata)
"""Formats embed_metadata / read_metadata handle (``jpg`` is accepted as an alias of ``jpeg``)."""


def _normalise_format(fmt: str) -> str:
    """The table's name for a format name or extension (``jpg``); ValueError when it takes no metadata."""
    found = format_for_extension(fmt)
    if found is None or not found.metadata:
        raise ValueError(f"unknown format {fmt!r}; expected one of {', '.join(METADATA_FORMATS)}")
    return found.name


def embed_metadata(data: bytes, fmt: str, record: dict[str, str]) -> bytes:
    """``data`` with ``record`` written into the format's own metadata place (see the module docs).

    Pixels, samples and geometry are left byte-identical (mp4: the streams are copied by
    ffmpeg, packets unchanged).  Embedding again replaces the earlier renderfleet record.
    Raises ValueError for an unknown format or a file that is not the format it claims.
    """
    key = _normalise_format(fmt)
    return _EMBEDDERS[key](bytes(data), checked_record(record))


def read_metadata(data: bytes, fmt: str) -> dict[str, str]:
    """The record embed_metadata wrote, or {} when the file carries none."""
    key = _normalise_format(fmt)
    return _READERS[key](bytes(data))
