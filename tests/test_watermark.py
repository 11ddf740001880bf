"""Invisible watermarks: lossless round trips, PSNR on noisy and saturated images, stock-decoder compatibility, MP4.

``pytest -s`` also prints the measured survival of each method through PNG, WebP, JPEG and H.264;
only what the module promises is asserted.
"""

from __future__ import annotations

import io
import os
import subprocess
import tempfile

import numpy as np
import pytest
from PIL import Image

from pipelines.media import watermark
from pipelines.media.video import encode_video
from pipelines.media.watermark import (
    DEFAULT_MESSAGE,
    METHODS,
    MIN_SIDE,
    WatermarkConfig,
    bit_accuracy,
    decode_bits,
    embed,
    embed_frames,
    psnr,
)

pytestmark = pytest.mark.timeout(180)

SIZES = [(256, 256), (384, 512)]  # (height, width)


# ---------------------------------------------------------------------------
# Test images
# ---------------------------------------------------------------------------


def natural(height: int, width: int, seed: int = 0) -> np.ndarray:
    """Gradients, a few flat discs and mild sensor-like noise: roughly what a diffusion model outputs."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    image = np.stack([x / width * 200 + 30, y / height * 180 + 40, (x + y) / (width + height) * 150 + 60], axis=-1)
    for _ in range(8):
        cy, cx, r = rng.uniform(0, height), rng.uniform(0, width), rng.uniform(10, min(height, width) / 3)
        image[(y - cy) ** 2 + (x - cx) ** 2 < r**2] = rng.uniform(20, 235, 3)
    image += rng.normal(0, 4, image.shape)
    return np.clip(image, 0, 255).round().astype(np.uint8)


def noise(height: int, width: int, seed: int = 0) -> np.ndarray:
    """Uniform noise over the full 0..255 range: the worst case for wrap-around and clipping."""
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def saturated(height: int, width: int, seed: int = 0) -> np.ndarray:
    """A natural image with large pure white, black, red and blue regions (blown highlights, crushed shadows)."""
    image = natural(height, width, seed).copy()
    image[: height // 2, : width // 2] = 255
    image[height // 2 :, width // 2 :] = 0
    image[: height // 2, width // 2 :] = (255, 0, 0)
    image[height // 2 :, : width // 4] = (0, 0, 255)
    return image


KINDS = {"natural": natural, "noise": noise, "saturated": saturated}


def moving_frames(count: int, height: int = 256, width: int = 256, seed: int = 0) -> list[np.ndarray]:
    """A slow pan over a natural image: frames that H.264 predicts from each other, as in a real video."""
    canvas = natural(height + 2 * count, width + 3 * count, seed)
    return [np.ascontiguousarray(canvas[2 * i : 2 * i + height, 3 * i : 3 * i + width]) for i in range(count)]


# ---------------------------------------------------------------------------
# Codecs
# ---------------------------------------------------------------------------


def pil_round_trip(image: np.ndarray, **save: object) -> np.ndarray:
    """Saves with Pillow and reads back as RGB."""
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, **save)
    return np.asarray(Image.open(io.BytesIO(buffer.getvalue())).convert("RGB"))


def decode_mp4(data: bytes, width: int, height: int) -> list[np.ndarray]:
    """Frames of an MP4 as RGB, converted back with the BT.709 limited-range matrix encode_video tags."""
    import imageio_ffmpeg

    with tempfile.TemporaryDirectory(prefix="rf-wm-") as tmp:
        path = os.path.join(tmp, "video.mp4")
        with open(path, "wb") as handle:
            handle.write(data)
        command = [
            imageio_ffmpeg.get_ffmpeg_exe(), "-hide_banner", "-nostdin", "-loglevel", "error", "-i", path,
            "-vf", "scale=in_color_matrix=bt709:in_range=tv", "-f", "rawvideo", "-pix_fmt", "rgb24", "pipe:1",
        ]  # fmt: skip
        raw = subprocess.run(command, capture_output=True, check=True, timeout=120).stdout
    frames = np.frombuffer(raw, dtype=np.uint8).reshape(-1, height, width, 3)
    return list(frames)


def mp4_accuracies(frames: list[np.ndarray], config: WatermarkConfig, crf: int) -> np.ndarray:
    """Per-frame bit accuracy after an H.264 yuv420p encode at ``crf`` and a decode."""
    data, extension, _ = encode_video(frames, 8, "mp4", crf=crf)
    assert extension == "mp4"
    decoded = decode_mp4(data, frames[0].shape[1], frames[0].shape[0])
    assert len(decoded) == len(frames)
    return np.array([bit_accuracy(frame, config) for frame in decoded])


def animation_accuracies(frames: list[np.ndarray], config: WatermarkConfig, output_format: str) -> np.ndarray:
    """Per-frame bit accuracy after encode_video's GIF (palette) or animated WebP (lossy q90) and a Pillow decode."""
    from PIL import ImageSequence

    data, _, _ = encode_video(frames, 8, output_format)
    decoded = [np.asarray(frame.convert("RGB")) for frame in ImageSequence.Iterator(Image.open(io.BytesIO(data)))]
    assert len(decoded) == len(frames)
    return np.array([bit_accuracy(frame, config) for frame in decoded])


def stock_decode(image: np.ndarray, method: str, kind: str = "bytes") -> object:
    """What the unmodified imwatermark decoder reads (it expects BGR, as cv2 loads images)."""
    from imwatermark import WatermarkDecoder

    return WatermarkDecoder(kind, 48).decode(np.ascontiguousarray(image[:, :, ::-1]), method)


# ---------------------------------------------------------------------------
# Lossless round trips and PSNR
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("kind", sorted(KINDS))
@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[1]}x{s[0]}")
def test_png_round_trip_and_psnr(method: str, kind: str, size: tuple[int, int]) -> None:
    config = WatermarkConfig(method=method)
    original = KINDS[kind](*size, seed=size[1])
    marked, status = embed(original, config)
    assert status == "embedded"
    assert isinstance(marked, np.ndarray) and marked.dtype == np.uint8 and marked.shape == original.shape
    quality = psnr(marked, original)
    reread = pil_round_trip(marked, format="PNG")
    np.testing.assert_array_equal(reread, marked)
    accuracy = bit_accuracy(reread, config)
    print(f"png {method:9s} {kind:9s} {size[1]}x{size[0]}: accuracy {accuracy:.2f}, PSNR {quality:.1f} dB")
    assert accuracy >= 0.95
    assert quality >= 35.0
    # The mark costs little, and nothing outside what the method reads (U) moves beyond rounding.
    assert np.abs(marked.astype(int) - original.astype(int)).max() < 64


@pytest.mark.parametrize("method", METHODS)
def test_saturated_regions_do_not_wrap(method: str) -> None:
    """imwatermark's encoder let saturated pixels wrap (255 -> ~0); ours keeps flat 0/255 areas close to where they were."""
    original = saturated(256, 256)
    marked, _ = embed(original, WatermarkConfig(method=method))
    diff = np.abs(marked.astype(int) - original.astype(int))
    white = original.sum(axis=-1) == 3 * 255
    black = original.sum(axis=-1) == 0
    # Wrapped pixels would be off by ~255; dwtDct puts each block's change on one 2x2 patch, dwtDctSvd spreads it.
    limit = 8 if method == "dwtDctSvd" else 40
    assert diff[white].max() <= limit and diff[black].max() <= limit and diff.max() <= limit
    assert psnr(marked, original) >= 35.0


def test_pil_in_pil_out_and_deterministic() -> None:
    config = WatermarkConfig()
    original = Image.fromarray(natural(256, 320, seed=3))
    marked, status = embed(original, config)
    assert status == "embedded"
    assert isinstance(marked, Image.Image) and marked.mode == "RGB" and marked.size == original.size
    assert bit_accuracy(marked, config) == 1.0
    again, _ = embed(original, config)
    assert np.array_equal(np.asarray(again), np.asarray(marked))  # same input, same bytes: resumable renders
    assert psnr(original, original) == float("inf")


def test_odd_sizes_are_marked() -> None:
    """Sides that are not multiples of 8 leave a margin unmarked, and both decoders still read the rest."""
    config = WatermarkConfig()
    original = natural(261, 333, seed=4)
    marked, status = embed(original, config)
    assert status == "embedded"
    assert bit_accuracy(marked, config) == 1.0
    assert stock_decode(marked, config.method) == config.message
    np.testing.assert_array_equal(marked[256:], original[256:])  # rows beyond the last whole 8x8 block
    np.testing.assert_array_equal(marked[:, 328:], original[:, 328:])


@pytest.mark.parametrize("shape", [(255, 300), (300, 255), (64, 64)])
def test_small_images_are_skipped(shape: tuple[int, int]) -> None:
    config = WatermarkConfig()
    original = natural(*shape)
    marked, status = embed(original, config)
    assert status == "skipped_small"
    assert marked is original
    pil = Image.fromarray(original)
    assert embed(pil, config) == (pil, "skipped_small")
    assert bit_accuracy(original, config) is None
    with pytest.raises(ValueError, match="too small"):
        decode_bits(original, config)
    frames, status = embed_frames([original, original], config)
    assert status == "skipped_small" and all(f is original for f in frames)
    assert min(shape) < MIN_SIDE


def test_bad_inputs() -> None:
    config = WatermarkConfig()
    with pytest.raises(ValueError, match="uint8"):
        embed(natural(256, 256).astype(np.float32), config)
    with pytest.raises(ValueError, match="HxWx3"):
        embed(np.zeros((256, 256, 4), dtype=np.uint8), config)
    with pytest.raises(ValueError, match="no frames"):
        embed_frames([], config)
    with pytest.raises(ValueError, match="shape"):
        psnr(np.zeros((4, 4, 3), np.uint8), np.zeros((4, 5, 3), np.uint8))


# ---------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------


def test_default_message_is_documented() -> None:
    assert DEFAULT_MESSAGE == b"rfleet" and len(DEFAULT_MESSAGE) * 8 == 48
    assert DEFAULT_MESSAGE.hex() == "72666c656574"
    assert "72666c656574" in (watermark.__doc__ or "")
    assert WatermarkConfig() == WatermarkConfig(method="dwtDctSvd", message=DEFAULT_MESSAGE)


def test_from_hex_round_trip() -> None:
    assert WatermarkConfig.from_hex(DEFAULT_MESSAGE.hex()) == WatermarkConfig()
    config = WatermarkConfig.from_hex("00FF10a0beEF", method="dwtDct")
    assert config.message == bytes([0x00, 0xFF, 0x10, 0xA0, 0xBE, 0xEF]) and config.method == "dwtDct"
    assert WatermarkConfig.from_hex(config.message.hex(), "dwtDct") == config
    marked, _ = embed(natural(256, 256, seed=5), config)
    assert bit_accuracy(marked, config) == 1.0
    assert stock_decode(marked, "dwtDct") == config.message


@pytest.mark.parametrize(
    "bad", ["", "72666c65657", "72666c6565740", "72666c65657g", "0x72666c6565", " 72666c656574", "72 66 6c 65 65 74", None, 0x72666C656574]
)
def test_from_hex_rejects(bad: object) -> None:
    with pytest.raises(ValueError, match="12 hex digits"):
        WatermarkConfig.from_hex(bad)  # type: ignore[arg-type]


def test_config_validation() -> None:
    with pytest.raises(ValueError, match="method"):
        WatermarkConfig(method="rivaGan")
    with pytest.raises(ValueError, match="6 bytes"):
        WatermarkConfig(message=b"toolong!")
    with pytest.raises(ValueError, match="6 bytes"):
        WatermarkConfig(message="rfleet")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="method"):
        WatermarkConfig.from_hex("72666c656574", method="dct")


# ---------------------------------------------------------------------------
# Compatibility with the stock decoder
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
def test_stock_decoder_reads_our_marks(method: str) -> None:
    config = WatermarkConfig(method=method)
    for image in (natural(384, 512, seed=6), saturated(256, 256, seed=7), noise(256, 256, seed=8)):
        marked, _ = embed(image, config)
        assert stock_decode(marked, method) == DEFAULT_MESSAGE


@pytest.mark.parametrize("method", METHODS)
def test_decode_bits_matches_stock_decoder(method: str) -> None:
    """Our vectorised reader gives the stock decoder's bits, marked or not (so bit_accuracy measures what others will read)."""
    config = WatermarkConfig(method=method)
    for image in (natural(256, 264, seed=9), noise(264, 256, seed=10)):
        for candidate in (image, pil_round_trip(embed(image, config)[0], format="JPEG", quality=80)):
            ours = decode_bits(candidate, config)
            stock = np.asarray(stock_decode(candidate, method, kind="bits"), dtype=np.uint8)
            np.testing.assert_array_equal(ours, stock)


# ---------------------------------------------------------------------------
# Video
# ---------------------------------------------------------------------------


def test_mp4_crf18_keeps_dwtdctsvd_mark() -> None:
    config = WatermarkConfig()
    frames = moving_frames(12)
    marked, status = embed_frames(frames, config)
    assert status == "embedded" and len(marked) == len(frames)
    assert min(psnr(a, b) for a, b in zip(marked, frames)) >= 35.0
    accuracies = mp4_accuracies(marked, config, crf=18)
    print(f"mp4 crf18 dwtDctSvd: min {accuracies.min():.2f} mean {accuracies.mean():.2f} over {len(accuracies)} frames")
    assert accuracies.min() >= 0.95


# ---------------------------------------------------------------------------
# Measured survival through lossy formats (printed; only lossless is asserted)
# ---------------------------------------------------------------------------


def test_measure_formats() -> None:
    images = [natural(256, 256, seed=11), natural(384, 512, seed=12), noise(256, 256, seed=13), saturated(512, 384, seed=14)]
    frames = moving_frames(10, seed=15)
    image_formats = {
        "png": {"format": "PNG"},
        "webp lossless": {"format": "WEBP", "lossless": True},
        "webp q95": {"format": "WEBP", "quality": 95},
        "jpeg q95": {"format": "JPEG", "quality": 95},
        "jpeg q90": {"format": "JPEG", "quality": 90},
    }
    rows = []
    for method in METHODS:
        config = WatermarkConfig(method=method)
        marked = [embed(image, config)[0] for image in images]
        quality = [psnr(m, i) for m, i in zip(marked, images)]
        for name, save in image_formats.items():
            accuracies = np.array([bit_accuracy(pil_round_trip(m, **save), config) for m in marked])
            rows.append((name, method, accuracies, quality))
            if "lossless" in name or name == "png":
                assert accuracies.min() >= 0.95, (name, method, accuracies)
        marked_frames, _ = embed_frames(frames, config)
        frame_quality = [psnr(m, f) for m, f in zip(marked_frames, frames)]
        for crf in (18, 23):
            rows.append((f"mp4 crf{crf}", method, mp4_accuracies(marked_frames, config, crf), frame_quality))
        for output_format in ("gif", "webp"):
            accuracies = animation_accuracies(marked_frames, config, output_format)
            rows.append((f"anim {output_format}", method, accuracies, frame_quality))
    print()
    print(f"{'format':14s} {'method':9s} {'min acc':>7s} {'mean acc':>8s} {'min PSNR':>8s} {'mean PSNR':>9s}")
    for name, method, accuracies, quality in rows:
        print(
            f"{name:14s} {method:9s} {accuracies.min():7.2f} {accuracies.mean():8.2f} "
            f"{min(quality):8.1f} {float(np.mean(quality)):9.1f}"
        )
