"""Decoding input assets (edit sources, masks, control images) with clear reasons for bad ones."""

from __future__ import annotations

import io

from PIL import Image, UnidentifiedImageError


class InputError(ValueError):
    """An input asset is unusable; the message says why."""


def decode_image(data: bytes, *, max_pixels: int, mode: str = "RGB", size: tuple[int, int] | None = None,
                 name: str = "input") -> Image.Image:
    """Decodes image bytes, refusing non-images and oversized ones, optionally resized to `size`."""
    try:
        image = Image.open(io.BytesIO(data))
        width, height = image.size
        if width * height > max_pixels:
            raise InputError(f"{name} is {width}x{height}, over the {max_pixels}-pixel input limit")
        image.load()
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as e:
        raise InputError(f"{name} is not a readable image: {e}") from None
    if mode == "L" and image.mode in ("RGBA", "LA"):
        # OpenAI-style masks: the transparent area is what gets edited (white in diffusers' masks).
        image = Image.eval(image.getchannel("A"), lambda a: 255 - a)
    image = image.convert(mode)
    if size is not None and image.size != size:
        image = image.resize(size, Image.Resampling.LANCZOS)
    return image


def edit_size(image_size: tuple[int, int], max_pixels: int) -> tuple[int, int]:
    """An edit's output size when the row gives none: the input's, scaled under the limit, multiples of 8."""
    w, h = image_size
    scale = min(1.0, (max_pixels / float(w * h)) ** 0.5)
    return max(8, int(w * scale) // 8 * 8), max(8, int(h * scale) // 8 * 8)
