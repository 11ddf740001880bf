"""Tests for pipelines.tiny.audio and pipelines.media.audio: tiny audio pipelines render to real WAV files."""

from __future__ import annotations

import io
import wave
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from diffusers import (
    AudioLDM2Pipeline,
    AudioLDMPipeline,
    DDPMPipeline,
    DDPMScheduler,
    DiffusionPipeline,
    StableAudioPipeline,
    UNet2DModel,
)

from helpers import load_pipeline
from pipelines.media.audio import audio_waveforms, encode_wav, sample_rate
from pipelines.tiny import SEED, write_spec
from pipelines.tiny.audio import AUDIO_MODELS

pytestmark = [
    pytest.mark.timeout(300),
    pytest.mark.usefixtures("one_torch_thread"),
    # torchsde's Brownian interval is built on [sigma_min, sigma_max] but StableAudio's schedule ends at sigma 0.
    pytest.mark.filterwarnings("ignore:Should have .*:UserWarning"),
    pytest.mark.filterwarnings("ignore:.*weight_norm.*:FutureWarning"),
    # AudioLDM2 drives GPT-2 with past_key_values, deprecated in transformers 5 (removal announced for 5.40).
    pytest.mark.filterwarnings("ignore:`past_key_values` is deprecated.*:FutureWarning"),
]

PROMPTS = ["the sound of a dog barking", "rain on a tin roof"]
SEEDS = (11, 22)
SECONDS = 1.0
PEAK = round(0.9 * 32767)  # encode_wav's normalised peak

# name: (class, length argument, sample rate, channels, hop in samples = duration tolerance)
FAMILIES: dict[str, tuple[type, str, int, int, int]] = {
    "tiny-audioldm": (AudioLDMPipeline, "audio_length_in_s", 16_000, 1, 160),  # vocoder hop: 10 ms
    "tiny-audioldm2": (AudioLDM2Pipeline, "audio_length_in_s", 16_000, 1, 160),
    "tiny-stable-audio": (StableAudioPipeline, "audio_end_in_s", 24_000, 2, 64),  # Oobleck hop: 2.7 ms
}


@pytest.fixture(scope="module")
def audio_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Builds every tiny audio model once, seeded as build_tiny_models does, each into root/<name>/."""
    root = tmp_path_factory.mktemp("tiny-audio")
    for name, spec in AUDIO_MODELS.items():
        write_spec(spec, root / name)
    return root


@pytest.fixture(scope="module")
def pipes(audio_root: Path) -> dict[str, DiffusionPipeline]:
    """Each model loaded once through the ordinary from_pretrained path, as workers load real checkpoints."""
    return {name: load_pipeline(audio_root / name) for name in AUDIO_MODELS}


def _render(pipe: DiffusionPipeline, name: str, seeds: tuple[int, ...] = SEEDS) -> Any:
    """One batched call for all prompts, one generator per prompt, the family's length argument at 1 s."""
    _, length_arg, *_ = FAMILIES[name]
    kwargs = dict(AUDIO_MODELS[name].entry["defaults"])
    kwargs[length_arg] = SECONDS
    generators = [torch.Generator("cpu").manual_seed(s) for s in seeds]
    return pipe(prompt=PROMPTS[: len(seeds)], generator=generators, **kwargs).audios


def _read_wav(data: bytes) -> tuple[Any, np.ndarray]:
    """Parameters and (frames, channels) int16 samples, read back with the stdlib only."""
    with wave.open(io.BytesIO(data), "rb") as wav:
        params = wav.getparams()
        frames = wav.readframes(params.nframes)
    return params, np.frombuffer(frames, dtype="<i2").reshape(-1, params.nchannels)


def test_entries_name_their_length_argument() -> None:
    assert set(AUDIO_MODELS) == set(FAMILIES)
    for name, spec in AUDIO_MODELS.items():
        assert spec.write is not None
        assert spec.entry["kind"] == "pipeline" and spec.entry["tasks"] == ["audio"]
        assert spec.entry["defaults"][FAMILIES[name][1]] == SECONDS
        assert "source" not in spec.entry


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_render_two_prompts_to_wav(name: str, pipes: dict[str, DiffusionPipeline], audio_root: Path) -> None:
    pipe = pipes[name]
    cls, _, rate, channels, hop = FAMILIES[name]
    assert type(pipe) is cls
    assert not list(audio_root.joinpath(name).rglob("*.bin"))  # safetensors only
    assert sample_rate(pipe) == rate

    waveforms = audio_waveforms(_render(pipe, name), batch_size=len(PROMPTS))
    assert len(waveforms) == len(PROMPTS)
    expected_frames = round(SECONDS * rate)
    for waveform in waveforms:
        assert waveform.dtype == np.float32
        assert waveform.shape == ((expected_frames,) if channels == 1 else (expected_frames, channels))
        data, ext, content_type = encode_wav(waveform, sample_rate(pipe))
        assert (ext, content_type) == ("wav", "audio/wav")
        assert data[:4] == b"RIFF" and data[8:12] == b"WAVE"
        params, samples = _read_wav(data)
        assert params.framerate == rate
        assert params.nchannels == channels
        assert params.sampwidth == 2  # int16
        assert abs(params.nframes - expected_frames) <= hop  # within one hop; measured: exact
        assert abs(int(np.abs(samples.astype(np.int32)).max()) - PEAK) <= 1
        assert int(np.abs(samples.astype(np.int32)).max()) < 32767  # no clipping
    assert not np.array_equal(waveforms[0], waveforms[1])  # different seeds and prompts, different audio


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_same_seed_same_samples(name: str, pipes: dict[str, DiffusionPipeline]) -> None:
    pipe = pipes[name]
    rate = sample_rate(pipe)
    first = [encode_wav(w, rate)[0] for w in audio_waveforms(_render(pipe, name), len(PROMPTS))]
    second = [encode_wav(w, rate)[0] for w in audio_waveforms(_render(pipe, name), len(PROMPTS))]
    assert first == second


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_builds_are_byte_identical(name: str, audio_root: Path, tmp_path: Path) -> None:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED + 1)  # the builder seeds itself, whatever the caller's RNG state
        AUDIO_MODELS[name].write(tmp_path / name)
    original = audio_root / name
    files = sorted(p.relative_to(original) for p in original.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(tmp_path / name) for p in (tmp_path / name).rglob("*") if p.is_file())
    for rel in files:
        assert (original / rel).read_bytes() == (tmp_path / name / rel).read_bytes(), rel


def test_sample_rate_rejects_image_pipelines() -> None:
    unet = UNet2DModel(
        sample_size=8,
        in_channels=1,
        out_channels=1,
        block_out_channels=(8, 8),
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        layers_per_block=1,
        norm_num_groups=8,
    )
    with pytest.raises(ValueError, match="DDPMPipeline"):
        sample_rate(DDPMPipeline(unet=unet, scheduler=DDPMScheduler()))


def test_audio_waveforms_layouts() -> None:
    t = 50
    stereo = torch.stack([torch.stack([torch.full((t,), 0.1 * b), torch.full((t,), -0.1 * b)]) for b in (1, 2)])
    out = audio_waveforms(stereo, 2)  # (B, C, T) torch, as StableAudio returns by default
    assert [w.shape for w in out] == [(t, 2), (t, 2)]
    assert np.allclose(out[1][:, 0], 0.2) and np.allclose(out[1][:, 1], -0.2)

    mono = np.arange(2 * t, dtype=np.float64).reshape(2, t)  # (B, T) numpy, as AudioLDM returns
    out = audio_waveforms(mono, 2)
    assert [w.shape for w in out] == [(t,), (t,)]
    assert all(w.dtype == np.float32 for w in out)
    assert out[1][0] == t

    assert [w.shape for w in audio_waveforms(np.zeros((2, 1, t)), 2)] == [(t,), (t,)]  # (B, 1, T)
    assert audio_waveforms(np.zeros(t), 1)[0].shape == (t,)  # un-batched single waveform
    assert [w.shape for w in audio_waveforms([np.zeros((t, 2)), np.zeros((2, t))], 2)] == [(t, 2), (t, 2)]
    with pytest.raises(ValueError, match="2 waveforms for 1 prompts"):
        audio_waveforms(mono, 1)
    with pytest.raises(ValueError):
        audio_waveforms(np.zeros((1, 20, 30)), 1)  # no plausible channel axis


def test_encode_wav_silence_stays_zero() -> None:
    data, _, _ = encode_wav(np.zeros(800, dtype=np.float32), 8000)
    params, samples = _read_wav(data)
    assert (params.nchannels, params.framerate, params.nframes) == (1, 8000, 800)
    assert not samples.any()


def test_encode_wav_stereo_interleaves_channels() -> None:
    waveform = np.zeros((100, 2), dtype=np.float32)
    waveform[10, 0] = 0.5  # left only
    waveform[20, 1] = -0.25  # right only, half the left peak
    params, samples = _read_wav(encode_wav(waveform, 44_100)[0])
    assert (params.nchannels, params.framerate, params.nframes) == (2, 44_100, 100)
    assert samples[10, 0] == PEAK and samples[10, 1] == 0
    assert samples[20, 1] == round(-PEAK / 2) and samples[20, 0] == 0


@pytest.mark.parametrize("peak", [1e-300, 7e-9, 1.0, 3.0])
def test_encode_wav_normalises_without_clipping(peak: float) -> None:
    waveform = peak * np.sin(np.linspace(0, 20 * np.pi, 1000))
    waveform[500] = -peak  # the negative peak is exact
    _, samples = _read_wav(encode_wav(waveform, 16_000)[0])
    assert int(np.abs(samples.astype(np.int32)).max()) == PEAK
    assert samples[500, 0] == -PEAK


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_encode_wav_rejects_non_finite(bad: float) -> None:
    waveform = np.zeros(10, dtype=np.float32)
    waveform[3] = bad
    with pytest.raises(ValueError, match="NaN or infinite"):
        encode_wav(waveform, 16_000)


def test_encode_wav_rejects_bad_shape_and_rate() -> None:
    with pytest.raises(ValueError, match="shape"):
        encode_wav(np.zeros((2, 3, 4)), 16_000)
    with pytest.raises(ValueError, match="sample rate"):
        encode_wav(np.zeros(10), 0)
