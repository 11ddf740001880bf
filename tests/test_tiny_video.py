"""Tests for pipelines.tiny.video and pipelines.media.video: tiny video pipelines that load, render and encode.

Every family is built offline, loaded through the ordinary
``DiffusionPipeline.from_pretrained`` (+ ``from_pipe`` for a
``pipeline_class`` entry), rendered, split per prompt and encoded; the files
are then checked with readers we did not write (the bundled ffmpeg, Pillow).
"""

from __future__ import annotations

import hashlib
import inspect
import io
import re
import struct
import subprocess
import time
from pathlib import Path
from typing import Any

import imageio_ffmpeg
import numpy as np
import pytest
import torch
from diffusers import (
    DiffusionPipeline,
    TextToVideoSDPipeline,
    TextToVideoZeroPipeline,
    WanPipeline,
)
from PIL import Image

from helpers import load_pipeline
from pipelines.media.video import VIDEO_FORMATS, encode_video, split_batch_frames, video_frames
from pipelines.tiny import build_t5_tokenizer, build_tiny_models, write_spec
from pipelines.tiny.video import VIDEO_MODELS

pytestmark = [pytest.mark.timeout(300), pytest.mark.usefixtures("one_torch_thread")]

FFMPEG = imageio_ffmpeg.get_ffmpeg_exe()
PROMPTS = ["a cat and the dog", "the thing of cats"]
SEEDS = [11, 22]
SIZE = 64
EXPECTED = {
    # name: (pipeline class, frames per video at the entry's defaults)
    "tiny-t2v": (TextToVideoSDPipeline, 8),
    "tiny-t2v-zero": (TextToVideoZeroPipeline, 4),
    "tiny-wan": (WanPipeline, 9),
}
FAMILIES = sorted(EXPECTED)


@pytest.fixture(scope="module")
def video_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Builds tiny-sd (for the weight comparison) and every video model once, seeded like build_tiny_models does."""
    root = tmp_path_factory.mktemp("tiny-video")
    build_tiny_models(root, ["tiny-sd"])
    for name, spec in VIDEO_MODELS.items():
        assert spec.write is not None, f"{name} has no writer"
        write_spec(spec, root / name)
    return root


def _load(root: Path, name: str) -> DiffusionPipeline:
    """Loads like a real checkpoint: from_pretrained, then from_pipe when the entry names a pipeline_class."""
    return load_pipeline(root / name, VIDEO_MODELS[name].entry.get("pipeline_class"))


@pytest.fixture(scope="module")
def pipes(video_root: Path) -> dict[str, DiffusionPipeline]:
    """Each family loaded once for the module."""
    return {name: _load(video_root, name) for name in FAMILIES}


def _call_kwargs(pipe: DiffusionPipeline, defaults: dict[str, Any]) -> dict[str, Any]:
    """The entry's defaults as this pipeline's call arguments: fps is for encoding, num_frames may be renamed."""
    accepted = set(inspect.signature(pipe.__call__).parameters)
    kwargs = {k: v for k, v in defaults.items() if k in accepted and k not in ("num_frames", "fps")}
    frames_arg = "num_frames" if "num_frames" in accepted else "video_length"  # Text2Video-Zero says video_length
    kwargs[frames_arg] = defaults["num_frames"]
    return kwargs


def _render(name: str, pipe: DiffusionPipeline, seeds: list[int]) -> list[list[np.ndarray]]:
    """Renders PROMPTS at the entry's defaults, one CPU generator per prompt, and splits per prompt."""
    kwargs = _call_kwargs(pipe, VIDEO_MODELS[name].entry["defaults"])
    generators = [torch.Generator("cpu").manual_seed(s) for s in seeds]
    with torch.inference_mode():
        if isinstance(pipe, TextToVideoZeroPipeline):
            # One prompt and one generator per call (see test_t2v_zero_takes_one_prompt_per_call);
            # its output is `.images`, a flat (F, H, W, 3) array.
            return [
                video_frames(pipe(prompt, generator=generator, **kwargs).images)
                for prompt, generator in zip(PROMPTS, generators)
            ]
        out = pipe(PROMPTS, generator=generators, output_type="np", **kwargs)
        return split_batch_frames(out.frames, len(PROMPTS))


@pytest.fixture(scope="module")
def rendered(pipes: dict[str, DiffusionPipeline]) -> dict[str, list[list[np.ndarray]]]:
    """Each family rendered once with SEEDS; prints the time per render."""
    results = {}
    for name in FAMILIES:
        start = time.perf_counter()
        results[name] = _render(name, pipes[name], SEEDS)
        print(f"{name}: {len(PROMPTS)} videos in {time.perf_counter() - start:.2f} s")
    return results


def _sha256(path: Path) -> str:
    """Content hash of one file, to compare weights across builds."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _ffmpeg(*args: str) -> str:
    """Runs the bundled ffmpeg and returns its stderr (where it reports streams and progress)."""
    proc = subprocess.run([FFMPEG, "-hide_banner", "-nostdin", *args], capture_output=True, text=True, timeout=60)
    return proc.stderr


def _mp4_box_order(data: bytes) -> list[str]:
    """Top-level ISO-BMFF box types in file order (to check +faststart: moov before mdat)."""
    boxes, offset = [], 0
    while offset + 8 <= len(data):
        size, kind = struct.unpack(">I4s", data[offset : offset + 8])
        if size == 1:
            size = struct.unpack(">Q", data[offset + 8 : offset + 16])[0]
        elif size == 0:
            size = len(data) - offset
        boxes.append(kind.decode("latin-1"))
        offset += size
    return boxes


def _decode_mp4(path: Path, width: int, height: int) -> np.ndarray:
    """Decodes an mp4 to RGB frames with ffmpeg (not our code)."""
    proc = subprocess.run(
        [FFMPEG, "-nostdin", "-loglevel", "error", "-i", str(path), "-f", "rawvideo", "-pix_fmt", "rgb24", "-"],
        capture_output=True,
        timeout=60,
        check=True,
    )
    return np.frombuffer(proc.stdout, dtype=np.uint8).reshape(-1, height, width, 3)


def _luma(rgb: np.ndarray) -> np.ndarray:
    """BT.709 luma of uint8 RGB frames, as float."""
    return rgb.astype(np.float64) @ np.array([0.2126, 0.7152, 0.0722])


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    """Peak signal-to-noise ratio of two arrays on a 0..255 scale, in dB."""
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


# ---------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------


def test_entries_are_video_catalog_entries() -> None:
    assert set(VIDEO_MODELS) == set(EXPECTED)
    for name, spec in VIDEO_MODELS.items():
        entry = spec.entry
        assert entry["kind"] == "pipeline" and entry["tasks"] == ["video"] and "source" not in entry, name
        defaults = entry["defaults"]
        assert defaults["width"] == defaults["height"] == SIZE, name
        assert defaults["num_frames"] == EXPECTED[name][1] and defaults["fps"] > 0, name
        assert all(not isinstance(v, (dict, list)) for v in defaults.values()), name
    wan = VIDEO_MODELS["tiny-wan"].entry["defaults"]
    assert (wan["num_frames"] - 1) % 4 == 0 and wan["width"] % 16 == 0 and wan["height"] % 16 == 0
    zero = VIDEO_MODELS["tiny-t2v-zero"].entry["defaults"]
    assert 0 <= zero["t0"] < zero["t1"] <= zero["num_inference_steps"] - 1


@pytest.mark.parametrize("name", FAMILIES)
def test_loads_as_right_class_with_safetensors_only(
    name: str, video_root: Path, pipes: dict[str, DiffusionPipeline]
) -> None:
    assert type(pipes[name]) is EXPECTED[name][0]
    model_dir = video_root / name
    assert list(model_dir.rglob("*.safetensors"))
    assert not [p for p in model_dir.rglob("*") if p.suffix in (".bin", ".pt", ".pth", ".ckpt", ".pkl")]


def test_entries_pass_the_catalog_schema(video_root: Path) -> None:
    """Given a source (as build_tiny_models adds), each entry is a valid catalog video pipeline."""
    from pipelines.catalog import Catalog

    data = {"models": {name: {"source": name, **spec.entry} for name, spec in VIDEO_MODELS.items()}}
    catalog = Catalog.from_dict(data, base_dir=video_root)
    for name in FAMILIES:
        entry = catalog.pipeline(name)
        assert entry.tasks == ("video",) and Path(entry.source) == (video_root / name).resolve()
        assert entry.pipeline_class == VIDEO_MODELS[name].entry.get("pipeline_class")


def test_t2v_zero_base_is_tiny_sd_with_ddim(video_root: Path) -> None:
    """Text2Video-Zero needs integer timesteps, so its base is tiny-sd's exact weights with DDIM instead of Euler."""
    zero_dir, sd_dir = video_root / "tiny-t2v-zero", video_root / "tiny-sd"
    weights = sorted(p.relative_to(sd_dir) for p in sd_dir.rglob("*.safetensors"))
    assert weights
    for rel in weights:
        assert _sha256(zero_dir / rel) == _sha256(sd_dir / rel), rel
    scheduler = (zero_dir / "scheduler" / "scheduler_config.json").read_text()
    assert '"DDIMScheduler"' in scheduler


def test_t5_tokenizer_appends_eos_and_pads() -> None:
    tokenizer = build_t5_tokenizer()
    ids = tokenizer("a cat").input_ids
    assert ids[-1] == tokenizer.eos_token_id and tokenizer.unk_token_id not in ids
    padded = tokenizer("a cat", padding="max_length", max_length=8).input_ids
    assert padded == ids + [tokenizer.pad_token_id] * (8 - len(ids))
    assert tokenizer.model_max_length == 77


# ---------------------------------------------------------------------------
# Rendering
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", FAMILIES)
def test_renders_one_video_per_prompt(name: str, rendered: dict[str, list[list[np.ndarray]]]) -> None:
    videos = rendered[name]
    assert len(videos) == len(PROMPTS)
    for frames in videos:
        assert len(frames) == EXPECTED[name][1]
        for frame in frames:
            assert frame.shape == (SIZE, SIZE, 3) and frame.dtype == np.uint8
        assert len({f.tobytes() for f in frames}) > 1, "all frames identical: not a video"
    assert not np.array_equal(np.stack(videos[0]), np.stack(videos[1])), "different prompts/seeds gave one video"


@pytest.mark.parametrize("name", FAMILIES)
def test_same_seed_same_frames(
    name: str, pipes: dict[str, DiffusionPipeline], rendered: dict[str, list[list[np.ndarray]]]
) -> None:
    again = _render(name, pipes[name], SEEDS)
    for first, second in zip(rendered[name], again):
        assert np.array_equal(np.stack(first), np.stack(second))


def test_t2v_zero_takes_one_prompt_per_call(pipes: dict[str, DiffusionPipeline]) -> None:
    """Documents why renderers call Text2Video-Zero per prompt: two prompts break its motion warp."""
    pipe = pipes["tiny-t2v-zero"]
    kwargs = _call_kwargs(pipe, VIDEO_MODELS["tiny-t2v-zero"].entry["defaults"])
    with pytest.raises((IndexError, RuntimeError, ValueError)):
        pipe(PROMPTS, generator=[torch.Generator("cpu").manual_seed(s) for s in SEEDS], **kwargs)


# ---------------------------------------------------------------------------
# Encoding, checked with ffmpeg and Pillow
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", FAMILIES)
def test_mp4_is_h264_with_every_frame(
    name: str, rendered: dict[str, list[list[np.ndarray]]], tmp_path: Path
) -> None:
    fps = VIDEO_MODELS[name].entry["defaults"]["fps"]
    for i, frames in enumerate(rendered[name]):
        data, ext, content_type = encode_video(frames, fps, "mp4")
        assert (ext, content_type) == ("mp4", "video/mp4")
        boxes = _mp4_box_order(data)
        assert boxes[0] == "ftyp" and boxes.index("moov") < boxes.index("mdat"), boxes
        path = tmp_path / f"{name}-{i}.mp4"
        path.write_bytes(data)

        info = _ffmpeg("-i", str(path))
        video = re.search(r"Video: (\w+).*?, (\d+)x(\d+)[, ].*?([\d.]+) fps", info)
        assert video, info
        assert video.group(1) == "h264"
        assert (int(video.group(2)), int(video.group(3))) == (SIZE, SIZE)
        assert float(video.group(4)) == pytest.approx(fps)
        assert "yuv420p" in info

        counted = re.findall(r"frame=\s*(\d+)", _ffmpeg("-i", str(path), "-map", "0:v", "-c", "copy", "-f", "null", "-"))
        assert counted and int(counted[-1]) == len(frames)

        decoded, source = _luma(_decode_mp4(path, SIZE, SIZE)), _luma(np.stack(frames))
        assert len(decoded) == len(source)
        # Luma only: 4:2:0 halves chroma, which on random-weight colour noise caps RGB PSNR near 23 dB
        # even at CRF 0.  Luma at CRF 18 should be far above garbage (~10 dB), frame by frame, in order.
        for index, frame in enumerate(decoded):
            scores = [_psnr(frame, other) for other in source]
            assert scores[index] > 30 and int(np.argmax(scores)) == index, (index, scores)


@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("fmt", ["gif", "webp"])
def test_gif_and_webp_open_in_pillow(name: str, fmt: str, rendered: dict[str, list[list[np.ndarray]]]) -> None:
    frames = rendered[name][0]
    fps = VIDEO_MODELS[name].entry["defaults"]["fps"]
    data, ext, content_type = encode_video(frames, fps, fmt)
    assert (ext, content_type) == (fmt, f"image/{fmt}")
    with Image.open(io.BytesIO(data)) as image:
        assert image.format == fmt.upper()
        assert image.size == (SIZE, SIZE)
        assert image.n_frames == len(frames)
        assert image.info.get("loop") == 0
        total_ms = 0
        for index in range(image.n_frames):
            image.seek(index)
            image.load()  # WebP reports a frame's duration only once it is decoded.
            total_ms += image.info["duration"]
        assert total_ms == pytest.approx(1000 * len(frames) / fps, abs=10)


def test_mp4_bytes_are_deterministic(rendered: dict[str, list[list[np.ndarray]]]) -> None:
    frames = rendered["tiny-t2v"][0]
    assert encode_video(frames, 8, "mp4")[0] == encode_video(frames, 8, "mp4")[0]


def test_lower_crf_means_more_bytes(rendered: dict[str, list[list[np.ndarray]]]) -> None:
    frames = rendered["tiny-wan"][0]
    assert len(encode_video(frames, 8, "mp4", crf=10)[0]) > len(encode_video(frames, 8, "mp4", crf=35)[0])


def test_fractional_fps_reaches_the_container(tmp_path: Path) -> None:
    frames = [np.full((16, 16, 3), 20 * i, dtype=np.uint8) for i in range(6)]
    path = tmp_path / "ntsc.mp4"
    path.write_bytes(encode_video(frames, 30000 / 1001, "mp4")[0])
    assert "29.97 fps" in _ffmpeg("-i", str(path))


# ---------------------------------------------------------------------------
# Normalising outputs and rejecting bad input (no models needed)
# ---------------------------------------------------------------------------


def _float_video(batch: int | None, frames: int = 3, size: int = 8) -> np.ndarray:
    """A float [0, 1] video batch (batch, F, H, W, 3), or one video (F, H, W, 3) when batch is None."""
    rng = np.random.default_rng(0)
    shape = (frames, size, size, 3) if batch is None else (batch, frames, size, size, 3)
    return rng.random(shape, dtype=np.float32)


def test_video_frames_handles_every_layout() -> None:
    batch = _float_video(1)
    expected = [(f * 255).round().astype(np.uint8) for f in batch[0]]
    tensor = torch.from_numpy(batch).permute(0, 1, 4, 2, 3)  # (B, F, C, H, W) like output_type="pt"
    pil = [[Image.fromarray(f) for f in expected]]
    layouts: list[Any] = [batch, batch[0], tensor, tensor[0], pil, pil[0], list(batch[0]), list(tensor[0])]
    for layout in layouts:
        got = video_frames(layout)
        assert len(got) == len(expected)
        for a, b in zip(got, expected):
            assert a.dtype == np.uint8 and a.shape == (8, 8, 3)
            np.testing.assert_array_equal(a, b)


def test_video_frames_converts_gray_rgba_and_uint8() -> None:
    gray = np.zeros((2, 8, 8, 1), dtype=np.float32)
    gray[1] = 1.0
    got = video_frames(gray)
    assert got[0].shape == (8, 8, 3) and got[1].min() == 255
    rgba = np.full((2, 8, 8, 4), 7, dtype=np.uint8)
    assert video_frames(rgba)[0].shape == (8, 8, 3)


def test_split_batch_frames() -> None:
    batch = _float_video(2)
    videos = split_batch_frames(batch, 2)
    assert len(videos) == 2 and all(len(v) == 3 for v in videos)
    assert not np.array_equal(videos[0][0], videos[1][0])
    pil = [[Image.fromarray(f) for f in v] for v in videos]
    assert [len(v) for v in split_batch_frames(pil, 2)] == [3, 3]
    assert len(split_batch_frames(batch[0], 1)) == 1
    with pytest.raises(ValueError, match="flat frame stack"):
        split_batch_frames(batch[0], 3)
    with pytest.raises(ValueError, match="2 videos for 3 prompts"):
        split_batch_frames(batch, 3)


def test_normalising_rejects_bad_outputs() -> None:
    with pytest.raises(ValueError, match="split_batch_frames"):
        video_frames(_float_video(2))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        video_frames(_float_video(None) * 2 - 1)  # [-1, 1], not decoded frames
    nan = _float_video(None)
    nan[0, 0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        video_frames(nan)
    with pytest.raises(TypeError):
        video_frames(Image.new("RGB", (8, 8)))
    with pytest.raises(ValueError):
        video_frames(np.zeros((4, 8, 8), dtype=np.float32))


def test_encode_video_rejects_bad_input() -> None:
    odd = [np.zeros((63, 64, 3), dtype=np.uint8)] * 2
    with pytest.raises(ValueError, match="even"):
        encode_video(odd, 8, "mp4")
    for fmt in ("gif", "webp"):  # Pillow formats have no parity rule.
        assert encode_video(odd, 8, fmt)[0]
    frames = [np.zeros((16, 16, 3), dtype=np.uint8)] * 2
    with pytest.raises(ValueError, match="format"):
        encode_video(frames, 8, "avi")
    with pytest.raises(ValueError, match="fps"):
        encode_video(frames, 0, "mp4")
    with pytest.raises(ValueError, match="crf"):
        encode_video(frames, 8, "mp4", crf=60)
    with pytest.raises(ValueError, match="uint8"):
        encode_video([np.zeros((16, 16, 3), dtype=np.float32)], 8, "gif")
    with pytest.raises(ValueError, match="differ"):
        encode_video([np.zeros((16, 16, 3), np.uint8), np.zeros((8, 8, 3), np.uint8)], 8, "gif")
    with pytest.raises(ValueError, match="no frames"):
        encode_video([], 8, "webp")
    assert VIDEO_FORMATS == ("mp4", "gif", "webp")


def test_ffmpeg_failure_is_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    """An encoder that dies is an error naming ffmpeg, not a silently empty file."""
    monkeypatch.setattr(imageio_ffmpeg, "get_ffmpeg_exe", lambda: "false")
    with pytest.raises(RuntimeError, match="ffmpeg failed"):
        encode_video([np.zeros((16, 16, 3), dtype=np.uint8)] * 3, 8, "mp4")
