"""Decoded outputs to file bytes: one encoder per task, checked against the format table.

The task fixes what a decoded output is (PIL image, uint8 frames, trimesh mesh, (waveform, rate)),
so it picks the encoder; the format table says which formats the task may write and gives the
extension and content type.  Codec modules are imported on first use, so importing this is cheap.
"""

from __future__ import annotations

from typing import Any, Protocol

from pipelines.media.formats import TASK_FORMATS, TASKS, OutputFormat, get_format

__all__ = ["DEFAULT_FPS", "ENCODERS", "Encoder", "encode"]

DEFAULT_FPS = 8.0
"""Frame rate of a video row that names none."""


class Encoder(Protocol):
    """Writes one decoded output of a task as bytes of ``fmt``."""

    def __call__(self, decoded: Any, fmt: OutputFormat, fps: float | None, extras: dict[str, Any] | None) -> bytes: ...


def _still(decoded: Any, fmt: OutputFormat, fps: float | None, extras: dict[str, Any] | None) -> bytes:
    """A PIL image with Pillow."""
    from pipelines.media.images import encode_image

    return encode_image(decoded, fmt.name)[0]


def _frames(decoded: Any, fmt: OutputFormat, fps: float | None, extras: dict[str, Any] | None) -> bytes:
    """HxWx3 uint8 frames as a video or an animation (animated WebP for video rows)."""
    from pipelines.media.video import encode_video

    return encode_video(decoded, fps or DEFAULT_FPS, fmt.name)[0]


def _mesh(decoded: Any, fmt: OutputFormat, fps: float | None, extras: dict[str, Any] | None) -> bytes:
    """A trimesh mesh, with ``extras`` in the format's own metadata place."""
    from pipelines.media.mesh import encode_mesh

    return encode_mesh(decoded, fmt.name, extras)[0]


def _waveform(decoded: Any, fmt: OutputFormat, fps: float | None, extras: dict[str, Any] | None) -> bytes:
    """A (waveform, sample rate) pair as 16-bit PCM."""
    from pipelines.media.audio import encode_wav

    waveform, rate = decoded
    return encode_wav(waveform, rate)[0]


ENCODERS: dict[str, Encoder] = {"image": _still, "edit": _still, "video": _frames, "mesh": _mesh, "audio": _waveform}
"""The encoder of each task in :data:`pipelines.media.formats.TASKS`."""


def encode(task: str, decoded: Any, output_format: str, fps: float | None = None,
           extras: dict[str, Any] | None = None) -> tuple[bytes, str, str]:
    """File bytes, extension and content type for one decoded output; ValueError for a format the task cannot write."""
    if task not in ENCODERS:
        raise ValueError(f"unknown task {task!r}; expected one of {', '.join(TASKS)}")
    fmt = get_format(output_format)
    if task not in fmt.tasks:
        raise ValueError(f"{task} outputs cannot be written as {fmt.name}; expected one of "
                         f"{', '.join(TASK_FORMATS[task])}")
    return ENCODERS[task](decoded, fmt, fps, extras), fmt.extension, fmt.mime
