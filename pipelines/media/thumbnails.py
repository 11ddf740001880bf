"""Video thumbnails: a video output's first frame as a still image, for OpenAI's `thumbnail` content variant.

WebP like OpenAI's (JPEG where Pillow was built without WebP), written by the image encoder. The first frame of
our videos already carries the invisible watermark, so the still keeps it; no provenance metadata is added.
"""

from __future__ import annotations

import io

from PIL import Image, features

from pipelines.media.images import encode_image
from pipelines.media.video import mp4_frames

THUMBNAIL_FORMAT = "webp" if features.check("webp") else "jpeg"
"""The still format thumbnails are written in."""


def first_frame(data: bytes, output_format: str) -> Image.Image:
    """A video output's first frame: MP4 through the bundled ffmpeg, animated GIF and WebP through Pillow."""
    if output_format == "mp4":
        frames = mp4_frames(data, limit=1)
        if not frames:
            raise ValueError("the mp4 has no video frames")
        return Image.fromarray(frames[0])
    image = Image.open(io.BytesIO(data))
    image.seek(0)
    return image.convert("RGB")


def video_thumbnail(data: bytes, output_format: str) -> tuple[bytes, str, str]:
    """The first frame as THUMBNAIL_FORMAT: (bytes, extension, content type)."""
    return encode_image(first_frame(data, output_format), THUMBNAIL_FORMAT)
