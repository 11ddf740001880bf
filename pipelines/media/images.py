"""Image encoder: a decoded PIL image to PNG, WebP or JPEG bytes (extension and MIME from the format table)."""

from __future__ import annotations

import io
from typing import Any

from PIL import Image

from pipelines.media.formats import FORMATS

PILLOW_OPTIONS: dict[str, tuple[str, dict[str, Any]]] = {
    # format: (Pillow format, save options)
    "png": ("PNG", {}),
    "webp": ("WEBP", {"quality": 95, "method": 4}),
    "jpeg": ("JPEG", {"quality": 95}),
}
"""How Pillow writes each still-image format (the only facts about them not in the format table)."""


def encode_image(image: Image.Image, output_format: str) -> tuple[bytes, str, str]:
    """Returns (bytes, extension, content type)."""
    if output_format not in PILLOW_OPTIONS:
        raise ValueError(f"unknown image format {output_format!r}; expected one of {', '.join(PILLOW_OPTIONS)}")
    pil_format, options = PILLOW_OPTIONS[output_format]
    buf = io.BytesIO()
    image.convert("RGB").save(buf, format=pil_format, **options)
    fmt = FORMATS[output_format]
    return buf.getvalue(), fmt.extension, fmt.mime
