"""`renderfleet verify FILE_OR_URI...`: is this our output? Watermark bit accuracy, provenance, credentials."""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image

from pipelines.media.formats import EXTENSIONS, format_for_path
from pipelines.media.provenance import read_metadata
from pipelines.media.watermark import MIN_SIDE, WatermarkConfig, bit_accuracy
from storage.fs import read_bytes

THRESHOLD = 0.9  # bit accuracy at or above which a file carries our mark (random: about 0.5)
FRAME_SAMPLES = 8


UNMARKED_SMALL = "unmarked_small"
"""Status of an image or video under the watermark's minimum side: never marked, so not a failure."""


@dataclass
class Verdict:
    """One file's result; `status` names the case (`watermarked`, `unmarked_small`, `no_watermark`, ...)."""

    uri: str
    ok: bool
    summary: str
    accuracy: float | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    credentials: dict[str, Any] | None = None
    status: str = ""

    def __post_init__(self) -> None:
        if not self.status:
            self.status = "ok" if self.ok else "failed"


def _video_frames(data: bytes, samples: int) -> list[np.ndarray]:
    """Evenly spaced frames (always the first and last), decoded by the bundled ffmpeg."""
    from pipelines.media.video import mp4_frames

    frames = mp4_frames(data)
    if len(frames) <= samples:
        return frames
    picks = sorted({round(i * (len(frames) - 1) / (samples - 1)) for i in range(samples)})
    return [frames[i] for i in picks]


def _animated_frames(data: bytes, samples: int) -> list[np.ndarray]:
    image = Image.open(io.BytesIO(data))
    count = getattr(image, "n_frames", 1)
    picks = sorted({round(i * (count - 1) / max(samples - 1, 1)) for i in range(min(samples, count))})
    frames = []
    for i in picks:
        image.seek(i)
        frames.append(np.asarray(image.convert("RGB")))
    return frames


def verify(uri: str, config: WatermarkConfig) -> Verdict:
    """Checks one file; ok means it carries our mark, or its format or size cannot carry one (see `status`)."""
    spec = format_for_path(uri)
    if spec is None:
        return Verdict(uri, False, f"unsupported file type (known: {', '.join(sorted(EXTENSIONS))})", status="unsupported")
    fmt = spec.name
    try:
        data = read_bytes(uri)
    except FileNotFoundError as e:
        return Verdict(uri, False, str(e), status="missing")
    try:
        metadata = read_metadata(data, fmt)
    except Exception as e:  # noqa: BLE001 - a file without readable metadata is still checked
        metadata = {"error": str(e)}
    credentials = None
    if spec.signable:
        try:
            from pipelines.media.credentials import read_credentials

            credentials = read_credentials(data, spec.mime)
        except Exception as e:  # noqa: BLE001
            credentials = {"error": str(e)}
    if not spec.watermark:
        return Verdict(uri, bool(metadata) and "error" not in metadata,
                       "no watermark in this format; provenance metadata " + ("found" if metadata else "missing"),
                       None, metadata, credentials, "metadata_only" if metadata and "error" not in metadata else "no_metadata")
    if fmt == "mp4":
        frames = _video_frames(data, FRAME_SAMPLES)
    elif fmt in ("gif", "webp") and getattr(Image.open(io.BytesIO(data)), "n_frames", 1) > 1:
        frames = _animated_frames(data, FRAME_SAMPLES)
    else:
        frames = [np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))]
    scores = [bit_accuracy(f, config) for f in frames]
    if any(s is None for s in scores):
        return Verdict(uri, True, f"too small to carry a watermark (under {MIN_SIDE} px on a side): not marked by design",
                       None, metadata, credentials, UNMARKED_SMALL)
    accuracy = min(scores)
    ok = accuracy >= THRESHOLD
    where = f"min over {len(frames)} frames" if len(frames) > 1 else "image"
    return Verdict(uri, ok, f"{'watermarked' if ok else 'NO watermark'} (bit accuracy {accuracy:.3f}, {where})",
                   accuracy, metadata, credentials, "watermarked" if ok else "no_watermark")


def print_verdict(v: Verdict) -> None:
    print(f"{'PASS' if v.ok else 'FAIL'} [{v.status}] {v.uri}: {v.summary}")
    for key, value in sorted(v.metadata.items()):
        if key != "renderfleet":
            print(f"    {key}: {value}")
    if v.credentials:
        print("    c2pa: " + json.dumps(v.credentials, default=str)[:400])
