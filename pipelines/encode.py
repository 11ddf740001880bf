"""Output encoders: decoded outputs to file bytes in standard formats."""

from __future__ import annotations

import io

from PIL import Image

IMAGE_FORMATS = {
    # format: (Pillow format, extension, content type, save options)
    "png": ("PNG", "png", "image/png", {}),
    "webp": ("WEBP", "webp", "image/webp", {"quality": 95, "method": 4}),
    "jpeg": ("JPEG", "jpg", "image/jpeg", {"quality": 95}),
}


def encode_image(image: Image.Image, output_format: str) -> tuple[bytes, str, str]:
    """Returns (bytes, extension, content type)."""
    pil_format, ext, content_type, options = IMAGE_FORMATS[output_format]
    buf = io.BytesIO()
    image.convert("RGB").save(buf, format=pil_format, **options)
    return buf.getvalue(), ext, content_type
