"""Video outputs: what video pipelines return, as uint8 frames, and those frames as file bytes.

Video pipelines disagree on what ``.frames`` (or ``.images``) holds, so every
renderer goes through :func:`video_frames` / :func:`split_batch_frames`,
which accept all the shapes diffusers produces and hand back plain
``H x W x 3`` uint8 RGB frames.  Shapes handled (``B`` videos, ``F`` frames,
``C`` in 1, 3 or 4 channels; a leading ``B`` is optional where noted):

* ``numpy.ndarray`` ``(B, F, H, W, C)`` or ``(F, H, W, C)``: ``output_type="np"``
  of TextToVideoSD, Wan, CogVideoX, AnimateDiff, ... (float in [0, 1]);
  Text2Video-Zero always returns ``(F, H, W, C)`` floats, whatever ``output_type``.
  Channels-first numpy arrays (``(..., C, H, W)``) are accepted too.
* ``torch.Tensor`` ``(B, F, C, H, W)`` or ``(F, C, H, W)``: ``output_type="pt"``
  (float in [0, 1]); channels-last tensors are accepted too.
* ``list[list[PIL.Image]]`` (one inner list per video): ``output_type="pil"``;
  a flat ``list[PIL.Image]`` is one video.
* lists of per-video arrays/tensors (4-D items) or of per-frame arrays/tensors
  (3-D or 2-D items).

Floats must lie in [0, 1] (up to rounding); they are scaled like diffusers'
``numpy_to_pil`` (``round(x * 255)``).  Anything far outside [0, 1] (latents,
[-1, 1] tensors) or containing NaN/inf (an fp16 VAE overflow) is rejected
rather than silently clipped into a plausible-looking but wrong video.
Grayscale is repeated to RGB and an alpha channel is dropped.

:func:`encode_video` writes H.264 MP4 (the bundled ffmpeg of imageio-ffmpeg,
so it works offline with no system ffmpeg), looping GIF and animated WebP
(Pillow).  No Ray imports: this runs inside actors and in plain scripts alike.
"""

from __future__ import annotations

import contextlib
import io
import math
import numbers
import os
import subprocess
import tempfile
from collections.abc import Sequence
from fractions import Fraction
from typing import Any

import numpy as np
from PIL import Image

from pipelines.media.formats import FORMATS, TASK_FORMATS

__all__ = [
    "VIDEO_FORMATS",
    "video_frames",
    "split_batch_frames",
    "encode_video",
    "mp4_frames",
]

VIDEO_FORMATS = TASK_FORMATS["video"]
"""Output formats :func:`encode_video` writes (extensions and content types: the format table)."""

WEBP_QUALITY = 90
"""Lossy WebP quality: lossless was 7.5x larger and 13x slower on a 16-frame 256x256 test clip."""

FFMPEG_TIMEOUT_S = 600.0
"""Upper bound for one ffmpeg encode, so a wedged encoder cannot hang an actor forever."""

_FLOAT_TOLERANCE = 0.5 / 255
"""How far floats may stray outside [0, 1] (rounding in the VAE/postprocess) before they are rejected."""

_CHANNELS = (1, 3, 4)


# ---------------------------------------------------------------------------
# Normalising pipeline outputs
# ---------------------------------------------------------------------------


def _is_tensor(value: Any) -> bool:
    """True for torch tensors, without importing torch for callers that never use it."""
    return type(value).__module__.startswith("torch") and hasattr(value, "detach")


def _to_numpy(value: Any) -> tuple[np.ndarray, bool]:
    """An array and whether it came from torch (diffusers' "pt" outputs are channels-first)."""
    if _is_tensor(value):
        tensor = value.detach().cpu()
        if tensor.is_floating_point():
            tensor = tensor.float()  # bf16/fp16 -> fp32: numpy has no bfloat16.
        return tensor.numpy(), True
    if isinstance(value, Image.Image):
        return np.asarray(value.convert("RGB")), False
    return np.asarray(value), False


def _channels_last(array: np.ndarray, from_torch: bool) -> np.ndarray:
    """Moves a channel axis at -3 to the end; torch arrays prefer channels-first, numpy channels-last."""
    if array.ndim < 3:
        return array
    first_ok = array.shape[-3] in _CHANNELS
    last_ok = array.shape[-1] in _CHANNELS
    if from_torch and first_ok or (first_ok and not last_ok):
        return np.moveaxis(array, -3, -1)
    if last_ok:
        return array
    raise ValueError(f"cannot find a 1/3/4-channel axis in frames shaped {array.shape}")


def _frame_uint8(frame: Any) -> np.ndarray:
    """One frame (PIL image, HxW, HxWxC or CxHxW array/tensor) as a contiguous HxWx3 uint8 array."""
    if isinstance(frame, Image.Image):
        return np.ascontiguousarray(np.asarray(frame.convert("RGB"), dtype=np.uint8))
    array, from_torch = _to_numpy(frame)
    if array.ndim == 2:
        array = array[:, :, None]
    elif array.ndim == 3:
        array = _channels_last(array, from_torch)
    else:
        raise ValueError(f"a frame must be 2-D or 3-D, got shape {array.shape}")
    array = _to_uint8(array)
    channels = array.shape[-1]
    if channels == 1:
        array = np.repeat(array, 3, axis=-1)
    elif channels == 4:
        array = array[..., :3]
    return np.ascontiguousarray(array)


def _to_uint8(array: np.ndarray) -> np.ndarray:
    """Float [0, 1] -> round(x * 255); integers must already be 0..255; anything else is an error."""
    if array.dtype == np.uint8:
        return array
    if array.dtype == np.bool_:
        return array.astype(np.uint8) * 255
    if np.issubdtype(array.dtype, np.integer):
        if array.size and (array.min() < 0 or array.max() > 255):
            raise ValueError(f"integer frames must lie in 0..255, got {array.min()}..{array.max()}")
        return array.astype(np.uint8)
    if not np.issubdtype(array.dtype, np.floating):
        raise ValueError(f"unsupported frame dtype {array.dtype}")
    if not np.all(np.isfinite(array)):
        raise ValueError("frames contain NaN or inf (an fp16 VAE overflow?): refusing to encode a black video")
    low, high = float(array.min()), float(array.max())
    if low < -_FLOAT_TOLERANCE or high > 1 + _FLOAT_TOLERANCE:
        raise ValueError(
            f"float frames must lie in [0, 1], got [{low:.3f}, {high:.3f}]: "
            "pass the pipeline's decoded output (output_type 'np', 'pil' or 'pt'), not latents or [-1, 1] tensors"
        )
    return (np.clip(array, 0.0, 1.0) * 255).round().astype(np.uint8)


def _video_uint8(video: Any) -> list[np.ndarray]:
    """One video (4-D array/tensor, or a sequence of frames) as a list of HxWx3 uint8 frames of one size."""
    if isinstance(video, (list, tuple)):
        frames = [_frame_uint8(frame) for frame in video]
    else:
        array, from_torch = _to_numpy(video)
        if array.ndim != 4:
            raise ValueError(f"a video must be 4-D (frames, H, W, C), got shape {array.shape}")
        array = _to_uint8(_channels_last(array, from_torch))
        frames = [_frame_uint8(frame) for frame in array]
    if not frames:
        raise ValueError("video has no frames")
    shapes = {frame.shape for frame in frames}
    if len(shapes) != 1:
        raise ValueError(f"frames of one video differ in size: {sorted(shapes)}")
    return frames


def _as_videos(output_frames: Any) -> tuple[list[Any], bool]:
    """Splits a pipeline output into per-video items; the flag says whether it had a batch axis."""
    if isinstance(output_frames, Image.Image):
        raise TypeError("got a single image, not a video: pass the pipeline's `.frames`")
    if _is_tensor(output_frames) or isinstance(output_frames, np.ndarray):
        ndim = len(output_frames.shape)
        if ndim == 5:
            return [output_frames[i] for i in range(output_frames.shape[0])], True
        if ndim == 4:
            return [output_frames], False
        raise ValueError(f"video output must be 4-D or 5-D, got shape {tuple(output_frames.shape)}")
    if isinstance(output_frames, (list, tuple)):
        if not output_frames:
            raise ValueError("pipeline returned no frames")
        first = output_frames[0]
        if isinstance(first, (list, tuple)):
            return list(output_frames), True
        if isinstance(first, Image.Image):
            return [list(output_frames)], False
        if _is_tensor(first) or isinstance(first, np.ndarray):
            ndim = len(first.shape)
            if ndim == 4:
                return list(output_frames), True
            if ndim in (2, 3):
                return [list(output_frames)], False
            raise ValueError(f"list items must be frames (2-D/3-D) or videos (4-D), got shape {tuple(first.shape)}")
    raise TypeError(f"unsupported video output type {type(output_frames).__name__}")


def video_frames(output_frames: Any) -> list[np.ndarray]:
    """ONE video's frames as HxWx3 uint8 arrays, from any shape diffusers returns (see module docs); a batch of 1 is unwrapped."""
    videos, _ = _as_videos(output_frames)
    if len(videos) != 1:
        raise ValueError(f"output holds {len(videos)} videos; use split_batch_frames for batched calls")
    return _video_uint8(videos[0])


def split_batch_frames(output_frames: Any, batch_size: int) -> list[list[np.ndarray]]:
    """One uint8 frame list per prompt from a batched call; refuses outputs whose per-prompt split would be a guess."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    videos, batched = _as_videos(output_frames)
    if not batched and batch_size > 1:
        # A flat (N, H, W, C) stack has no video axis; its frame order is pipeline-specific
        # (Text2Video-Zero interleaves prompts, and only supports one prompt per call anyway).
        raise ValueError(
            f"output is a single flat frame stack, cannot split it into {batch_size} videos: "
            "call the pipeline once per prompt"
        )
    if len(videos) != batch_size:
        raise ValueError(f"pipeline returned {len(videos)} videos for {batch_size} prompts")
    return [_video_uint8(video) for video in videos]


# ---------------------------------------------------------------------------
# Encoding
# ---------------------------------------------------------------------------


def _checked_frames(frames: Sequence[np.ndarray]) -> tuple[list[np.ndarray], int, int]:
    """Frames as contiguous HxWx3 uint8 arrays of one size, and that (width, height)."""
    if len(frames) == 0:
        raise ValueError("no frames to encode")
    checked = []
    for i, frame in enumerate(frames):
        array = np.asarray(frame)
        if array.dtype != np.uint8 or array.ndim != 3 or array.shape[2] != 3:
            raise ValueError(
                f"frame {i}: expected an HxWx3 uint8 array, got {array.dtype} {array.shape} (use video_frames first)"
            )
        checked.append(np.ascontiguousarray(array))
    shapes = {a.shape for a in checked}
    if len(shapes) != 1:
        raise ValueError(f"frames differ in size: {sorted(shapes)}")
    height, width = checked[0].shape[:2]
    return checked, width, height


def _frame_durations(count: int, fps: float, ticks_per_second: int) -> list[int]:
    """Per-frame durations in ticks whose running sum tracks i/fps exactly, so GIF's 1/100 s grid keeps the average rate."""
    stamps = [math.floor(i * ticks_per_second / fps + 0.5) for i in range(count + 1)]
    return [max(1, b - a) for a, b in zip(stamps, stamps[1:])]


def _ffmpeg_rate(fps: float) -> str:
    """The frame rate as an exact fraction for ffmpeg (e.g. 29.97 -> 30000/1001)."""
    rate = Fraction(fps).limit_denominator(1001)
    return f"{rate.numerator}/{rate.denominator}"


def _encode_mp4(frames: list[np.ndarray], width: int, height: int, fps: float, crf: int) -> bytes:
    """H.264/yuv420p MP4 with the moov atom first, by piping raw RGB frames to imageio-ffmpeg's bundled ffmpeg."""
    if width % 2 or height % 2:
        raise ValueError(
            f"mp4 (H.264 yuv420p) needs even width and height, got {width}x{height}: "
            "render an even size (pipelines use multiples of 8) or choose gif/webp"
        )
    import imageio_ffmpeg

    with tempfile.TemporaryDirectory(prefix="rf-video-") as tmp:
        out_path = os.path.join(tmp, "video.mp4")
        log_path = os.path.join(tmp, "ffmpeg.log")
        command = [
            imageio_ffmpeg.get_ffmpeg_exe(),
            "-hide_banner", "-nostdin", "-loglevel", "error", "-y",
            "-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{width}x{height}",
            "-framerate", _ffmpeg_rate(fps), "-i", "pipe:0",
            "-an", "-c:v", "libx264", "-preset", "medium", "-crf", str(crf),
            # RGB -> limited-range BT.709 YUV, tagged as such so players convert back with the same matrix
            # (tags via setparams: the -color_primaries/-color_trc output options left them "unknown" here).
            "-vf", "scale=out_color_matrix=bt709:out_range=tv,format=yuv420p,"
            "setparams=color_primaries=bt709:color_trc=bt709:colorspace=bt709:range=tv",
            # moov before mdat: browsers can start playing before the whole file arrives.
            "-movflags", "+faststart",
            # No tool version or timestamps in the container, so equal frames give equal bytes.
            "-map_metadata", "-1", "-fflags", "+bitexact", "-flags:v", "+bitexact",
            "-f", "mp4", out_path,
        ]  # fmt: skip
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=log)
        assert proc.stdin is not None
        try:
            try:
                for frame in frames:
                    proc.stdin.write(frame.tobytes())
            except BrokenPipeError:
                pass  # ffmpeg exited early; its log says why (reported below).
            finally:
                with contextlib.suppress(OSError):
                    proc.stdin.close()
            returncode = proc.wait(timeout=FFMPEG_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            raise RuntimeError(
                f"ffmpeg did not finish encoding {len(frames)} frames in {FFMPEG_TIMEOUT_S:.0f} s"
            ) from None
        finally:
            if proc.poll() is None:  # Interrupted or timed out: never leave an encoder behind.
                proc.kill()
                proc.wait()
        if returncode != 0:
            with open(log_path, encoding="utf-8", errors="replace") as log_file:
                detail = log_file.read().strip()[-2000:]
            raise RuntimeError(f"ffmpeg failed (exit {returncode}) encoding {width}x{height} mp4: {detail}")
        with open(out_path, "rb") as fh:
            return fh.read()


def _encode_pillow(frames: list[np.ndarray], fps: float, output_format: str) -> bytes:
    """Looping animated GIF or WebP through Pillow."""
    images = [Image.fromarray(frame) for frame in frames]
    buf = io.BytesIO()
    if output_format == "gif":
        # GIF delays are in 1/100 s; Pillow takes ms, so pass multiples of 10.
        # Caveat: Pillow merges consecutive identical frames into one longer frame.
        durations = [10 * d for d in _frame_durations(len(images), fps, 100)]
        images[0].save(buf, format="GIF", save_all=True, append_images=images[1:], duration=durations, loop=0)
    else:
        durations = _frame_durations(len(images), fps, 1000)
        images[0].save(
            buf,
            format="WEBP",
            save_all=True,
            append_images=images[1:],
            duration=durations,
            loop=0,
            lossless=False,
            quality=WEBP_QUALITY,
            method=4,
        )
    return buf.getvalue()


def encode_video(
    frames: list[np.ndarray], fps: float, output_format: str, crf: int = 18
) -> tuple[bytes, str, str]:
    """Encodes HxWx3 uint8 frames as mp4/gif/webp, returning (bytes, extension, content type); crf (0-51, mp4 only) stays 18 since stronger compression weakens invisible watermarks."""
    if output_format not in VIDEO_FORMATS:
        raise ValueError(f"unknown video format {output_format!r}; expected one of {', '.join(VIDEO_FORMATS)}")
    if isinstance(fps, bool) or not isinstance(fps, numbers.Real) or not math.isfinite(fps) or fps <= 0:
        raise ValueError(f"fps must be a positive number, got {fps!r}")
    if isinstance(crf, bool) or not isinstance(crf, numbers.Integral) or not 0 <= crf <= 51:
        raise ValueError(f"crf must be an integer in 0..51, got {crf!r}")
    checked, width, height = _checked_frames(frames)
    if output_format == "mp4":
        data = _encode_mp4(checked, width, height, float(fps), int(crf))
    else:
        data = _encode_pillow(checked, float(fps), output_format)
    fmt = FORMATS[output_format]
    return data, fmt.extension, fmt.mime


def mp4_frames(data: bytes, limit: int | None = None) -> list[np.ndarray]:
    """An MP4's frames as HxWx3 uint8 arrays (only the first `limit`), decoded by the bundled ffmpeg: verify and
    video thumbnails read our outputs back with it."""
    import imageio_ffmpeg

    output = ["-frames:v", str(limit)] if limit is not None else None  # ffmpeg stops there: no frame decoded in vain
    with tempfile.NamedTemporaryFile(suffix=".mp4") as f:
        f.write(data)
        f.flush()
        reader = imageio_ffmpeg.read_frames(f.name, output_params=output)
        try:
            width, height = next(reader)["size"]
            return [np.frombuffer(b, np.uint8).reshape(height, width, 3) for b in reader]
        finally:
            reader.close()
