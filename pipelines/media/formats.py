"""The one output-format table: per format its extension, MIME type, tasks and finishing steps.

Everything that differs per output format is read from :data:`FORMATS`: the encoders' extensions
and content types, :func:`pipelines.media.encode.encode` (which task may write which format), the
finishing steps (watermark, provenance metadata, C2PA), ``renderfleet verify`` and the online file
endpoint.  Adding a format is one entry here plus its support in the task's encoder.

The encoder is picked by task (:data:`pipelines.media.encode.ENCODERS`: the decoded output's
kind), with the format name as its parameter, so ``webp`` is one format written by two encoders
(still and animated).  It is not a column here because the encoders read this table: the table
imports nothing, so tools that only look files up (verify, serve) load no codec library.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

__all__ = [
    "EXTENSIONS",
    "FORMATS",
    "TASKS",
    "TASK_FORMATS",
    "OutputFormat",
    "format_for_extension",
    "format_for_path",
    "get_format",
]

TASKS: tuple[str, ...] = ("image", "edit", "video", "mesh", "audio")
"""Every task renderfleet renders."""

TASK_FORMATS: dict[str, tuple[str, ...]] = {
    "image": ("png", "webp", "jpeg"),
    "edit": ("png", "webp", "jpeg"),
    "video": ("mp4", "gif", "webp"),
    "mesh": ("glb", "ply", "obj"),
    "audio": ("wav",),
}
"""Formats each task can write; the first is the default (rows without ``output_format``)."""


@dataclass(frozen=True)
class OutputFormat:
    """One output file format and what renderfleet does differently for it."""

    name: str
    """The name rows and API requests use (``output_format``)."""
    extension: str
    """File extension, without the dot (``jpeg`` is stored as ``.jpg``)."""
    mime: str
    """Content type for object-store metadata, HTTP responses and C2PA."""
    tasks: tuple[str, ...]
    """Tasks that can write this format (``webp`` serves images and video)."""
    watermark: bool
    """The invisible watermark is embedded in its pixels before encoding."""
    signable: bool
    """C2PA Content Credentials can be signed into it (c2pa-python supports the container)."""
    metadata: bool
    """Provenance metadata can be embedded in it (:mod:`pipelines.media.provenance`)."""


def _format(name: str, extension: str, mime: str, *, watermark: bool, signable: bool,
            metadata: bool = True) -> OutputFormat:
    """One entry; its tasks come from TASK_FORMATS, so each fact is written once."""
    tasks = tuple(task for task in TASKS if name in TASK_FORMATS[task])
    return OutputFormat(name, extension, mime, tasks, watermark, signable, metadata)


FORMATS: dict[str, OutputFormat] = {
    f.name: f
    for f in (
        _format("png", "png", "image/png", watermark=True, signable=True),
        _format("webp", "webp", "image/webp", watermark=True, signable=True),
        _format("jpeg", "jpg", "image/jpeg", watermark=True, signable=True),
        _format("mp4", "mp4", "video/mp4", watermark=True, signable=True),
        _format("gif", "gif", "image/gif", watermark=True, signable=False),
        _format("glb", "glb", "model/gltf-binary", watermark=False, signable=False),
        # PLY has no registered media type; this is the common de facto one.
        _format("ply", "ply", "application/ply", watermark=False, signable=False),
        _format("obj", "obj", "model/obj", watermark=False, signable=False),
        _format("wav", "wav", "audio/wav", watermark=False, signable=False),
    )
}
"""Every output format by name, in TASK_FORMATS order."""

EXTENSIONS: dict[str, OutputFormat] = {
    **{f.name: f for f in FORMATS.values()},  # e.g. files saved as .jpeg by other tools
    **{f.extension: f for f in FORMATS.values()},
}
"""Format by file extension (lower case, no dot); format names are accepted as extensions too."""


def format_for_extension(extension: str) -> OutputFormat | None:
    """The format a file extension (``jpg``, ``.PNG``) stands for, or None: for tools that see only files."""
    return EXTENSIONS.get(extension.lower().lstrip("."))


def format_for_path(path: str) -> OutputFormat | None:
    """The format of a path or URI, by its extension, or None."""
    return format_for_extension(os.path.splitext(path)[1])


def get_format(name: str) -> OutputFormat:
    """The format a name (or an extension such as ``jpg``) stands for; ValueError when unknown."""
    fmt = format_for_extension(name)
    if fmt is None:
        raise ValueError(f"unknown format {name!r}; expected one of {', '.join(FORMATS)}")
    return fmt

