"""Audio outputs: a pipeline's sample rate, per-prompt waveforms, and WAV bytes.

Text-to-audio pipelines disagree on where their output rate lives (the
vocoder's config for AudioLDM/AudioLDM2/MusicLDM, the VAE for StableAudio),
on the type of ``.audios`` (numpy for AudioLDM, a torch tensor by default for
StableAudio) and on its shape (``(B, T)`` mono, ``(B, C, T)`` multi-channel).
This module hides those differences: the rest of renderfleet sees one float
array per prompt, ``(T,)`` mono or ``(T, C)``, and encodes it to a standard
16-bit PCM WAV with the stdlib ``wave`` module.
"""

from __future__ import annotations

import io
import wave
from collections.abc import Sequence
from typing import Any

import numpy as np

from pipelines.media.formats import FORMATS

__all__ = ["sample_rate", "audio_waveforms", "encode_wav"]

WAV_PEAK = 0.9
"""Peak level after normalisation, as a fraction of int16 full scale: headroom, and never clipping."""

MAX_CHANNELS = 8
"""Upper bound on a waveform's channel axis, used to tell (C, T) from (T, C); 7.1 audio is 8 channels."""

_INT16_FULL_SCALE = 32767


def _config_value(component: Any, key: str) -> Any:
    """A config entry from a transformers config (attributes) or a diffusers FrozenDict (mapping)."""
    config = getattr(component, "config", None)
    if config is None:
        return None
    if isinstance(config, dict):
        return config.get(key)
    return getattr(config, key, None)


def _positive_int(value: Any) -> int | None:
    """The rate as an int when it is a usable positive whole number, else None (so the next source is tried)."""
    if value is None or isinstance(value, bool):
        return None
    try:
        rate = int(value)
    except (TypeError, ValueError):
        return None
    return rate if rate > 0 and rate == value else None


def sample_rate(pipe: Any) -> int:
    """The pipeline's own output rate in Hz, so WAV headers match what the model was trained to emit."""
    vocoder = getattr(pipe, "vocoder", None)  # AudioLDM, AudioLDM2, MusicLDM: the vocoder makes the waveform
    vae = getattr(pipe, "vae", None)  # StableAudio: the Oobleck VAE decodes straight to a waveform
    unet = getattr(pipe, "unet", None)  # DanceDiffusion: a waveform UNet with its own rate
    candidates = (
        _config_value(vocoder, "sampling_rate"),
        getattr(vae, "sampling_rate", None),
        _config_value(vae, "sampling_rate"),
        _config_value(unet, "sample_rate"),
    )
    for value in candidates:
        rate = _positive_int(value)
        if rate is not None:
            return rate
    raise ValueError(
        f"{type(pipe).__name__} has no audio sample rate (looked for vocoder.config.sampling_rate, "
        "vae.sampling_rate / vae.config.sampling_rate, unet.config.sample_rate): is it an audio pipeline?"
    )


def _to_numpy(audio: Any) -> np.ndarray:
    """Float numpy from numpy or torch (any device, bf16/fp16 included) without importing torch here."""
    if hasattr(audio, "detach"):  # torch.Tensor
        audio = audio.detach().cpu().float().numpy()
    return np.asarray(audio, dtype=np.float32)


def _one_waveform(item: np.ndarray) -> np.ndarray:
    """One prompt's audio as (T,) mono or (T, C), whichever axis order the pipeline used."""
    while item.ndim > 2 and 1 in item.shape[:-1]:  # e.g. (1, C, T) or (C, 1, T): drop singleton axes before time
        item = np.squeeze(item, axis=item.shape[:-1].index(1))
    if item.ndim == 1:
        return np.ascontiguousarray(item)
    if item.ndim != 2:
        raise ValueError(f"cannot read a waveform of shape {item.shape}: expected (T,), (C, T) or (T, C)")
    rows, cols = item.shape
    if rows <= cols and rows <= MAX_CHANNELS:  # diffusers' convention: channels first
        item = item.T
    elif cols > MAX_CHANNELS:
        raise ValueError(
            f"cannot tell channels from time in a waveform of shape {item.shape}: "
            f"neither axis has at most {MAX_CHANNELS} channels"
        )
    if item.shape[1] == 1:
        return np.ascontiguousarray(item[:, 0])
    return np.ascontiguousarray(item)


def audio_waveforms(output_audios: Any, batch_size: int) -> list[np.ndarray]:
    """Splits a pipeline's `.audios` into one float32 array per prompt, (T,) mono or (T, C), so callers never see the family's layout."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if isinstance(output_audios, Sequence) and not isinstance(output_audios, (str, bytes)):
        items = [_to_numpy(a) for a in output_audios]
    else:
        audios = _to_numpy(output_audios)
        if audios.ndim == 1 and batch_size == 1:  # an un-batched single waveform
            audios = audios[None]
        if audios.ndim < 2:
            raise ValueError(f"expected a batch of waveforms, got shape {audios.shape}")
        items = list(audios)
    if len(items) != batch_size:
        raise ValueError(
            f"got {len(items)} waveforms for {batch_size} prompts; render one waveform per prompt "
            "(num_waveforms_per_prompt=1)"
        )
    return [_one_waveform(item) for item in items]


def encode_wav(waveform: np.ndarray, rate: int) -> tuple[bytes, str, str]:
    """16-bit PCM WAV bytes, peak-normalised to 0.9 full scale so near-silent random outputs are audible and nothing clips."""
    samples = np.asarray(waveform, dtype=np.float64)
    if samples.ndim == 1:
        channels = 1
    elif samples.ndim == 2 and samples.shape[1] >= 1:
        channels = samples.shape[1]
    else:
        raise ValueError(f"waveform must be (T,) mono or (T, C), got shape {samples.shape}")
    rate_value = _positive_int(rate)
    if rate_value is None:
        raise ValueError(f"sample rate must be a positive integer, got {rate!r}")
    if not np.isfinite(samples).all():
        raise ValueError("waveform contains NaN or infinite samples; refusing to encode it")
    peak = float(np.max(np.abs(samples))) if samples.size else 0.0
    if peak > 0.0:
        # Divide first: peak / a tiny peak is exactly 1, while full scale / a subnormal peak overflows to inf.
        samples = samples / peak * (WAV_PEAK * _INT16_FULL_SCALE)
    pcm = np.round(samples).astype("<i2")  # |values| <= 0.9 * 32767 after scaling: no clipping possible
    buf = io.BytesIO()
    with wave.open(buf, "wb") as out:
        out.setnchannels(channels)
        out.setsampwidth(2)
        out.setframerate(rate_value)
        out.writeframes(pcm.tobytes())  # (T, C) row-major is WAV's interleaved frame order
    fmt = FORMATS["wav"]
    return buf.getvalue(), fmt.extension, fmt.mime
