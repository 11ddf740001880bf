"""Tiny random-weight text-to-audio pipelines, built fully offline.

The audio counterpart of :mod:`pipelines.tiny.sd`: small, deterministic pipelines
that load through the ordinary ``DiffusionPipeline.from_pretrained(dir)`` path,
so audio rendering is tested end to end without any Hub access.  Every
tokenizer is built locally and every model from a config with random weights.

Families:

* ``tiny-audioldm``: ``AudioLDMPipeline`` (deprecated in diffusers 0.42 but
  loads): CLAP text encoder + RoBERTa tokenizer, a UNet conditioned through its
  class embedding, a 1-channel mel-spectrogram VAE and a HiFi-GAN vocoder.
  Mono, 16 kHz (the vocoder's ``sampling_rate``), length set by
  ``audio_length_in_s``.
* ``tiny-audioldm2``: ``AudioLDM2Pipeline``: full CLAP model (text and audio
  towers) + RoBERTa tokenizer, T5 encoder + T5 tokenizer, a projection into a
  GPT-2 language model (``GPT2LMHeadModel``: ``GPT2Model`` lacks the generation
  helpers the pipeline calls under transformers 5), a UNet with two
  cross-attention streams, and the same mel VAE and vocoder as AudioLDM.
  Mono, 16 kHz, ``audio_length_in_s``.
* ``tiny-stable-audio``: ``StableAudioPipeline``: T5 text encoder, Oobleck
  waveform VAE, a DiT and the cosine DPM-Solver SDE scheduler (needs
  ``torchsde``).  Stereo, 24 kHz (the VAE's ``sampling_rate``), length set by
  ``audio_end_in_s`` (and ``audio_start_in_s``), at most
  ``transformer.sample_size * vae.hop_length / sampling_rate`` seconds.
"""

from __future__ import annotations

import math
from typing import Any

from diffusers import (
    AudioLDM2Pipeline,
    AudioLDM2ProjectionModel,
    AudioLDM2UNet2DConditionModel,
    AudioLDMPipeline,
    AutoencoderOobleck,
    CosineDPMSolverMultistepScheduler,
    DDIMScheduler,
    StableAudioDiTModel,
    StableAudioPipeline,
    UNet2DConditionModel,
)
from diffusers.pipelines.stable_audio.modeling_stable_audio import StableAudioProjectionModel
from transformers import (
    ClapAudioConfig,
    ClapConfig,
    ClapFeatureExtractor,
    ClapModel,
    ClapTextConfig,
    ClapTextModelWithProjection,
    GPT2Config,
    GPT2LMHeadModel,
    SpeechT5HifiGan,
    SpeechT5HifiGanConfig,
)

from pipelines.tiny.common import (
    MODEL_MAX_LENGTH,
    TinySpec,
    build_t5_tokenizer,
    roberta_tokenizer,
    save_pipeline,
    seeded,
    t5_encoder,
    tiny_vae,
    tokenizer_ids,
)

__all__ = ["AUDIO_MODELS", "build_tiny_audioldm", "build_tiny_audioldm2", "build_tiny_stable_audio"]

AUDIOLDM_SAMPLE_RATE = 16_000
"""AudioLDM's real output rate; the tiny vocoder keeps it so durations mean what they do in production."""

AUDIOLDM_HOP = 160
"""Vocoder samples per mel frame (10 ms at 16 kHz, as in AudioLDM): product of the upsample rates."""

AUDIOLDM_MEL_BINS = 64
"""Mel bins (vocoder ``model_in_dim``); must be divisible by the VAE's 8x scale factor."""

STABLE_AUDIO_SAMPLE_RATE = 24_000
"""Differs from AudioLDM's on purpose, so tests catch a rate taken from the wrong place."""

STABLE_AUDIO_RATIOS = (2, 4, 8)
"""Oobleck downsampling ratios (hop 64); even strides keep the decoder's output exactly latent_len * hop."""

STABLE_AUDIO_LATENT_FRAMES = 384
"""DiT sample size: 384 * 64 / 24000 = 1.024 s, the longest clip the tiny model can render."""


def _audioldm_vocoder() -> SpeechT5HifiGan:
    """A 4-stage HiFi-GAN with AudioLDM's 16 kHz / 160-sample hop, so 1 s of audio is a realistic 100 mel frames."""
    rates = (5, 4, 4, 2)
    assert math.prod(rates) == AUDIOLDM_HOP
    config = SpeechT5HifiGanConfig(
        model_in_dim=AUDIOLDM_MEL_BINS,
        sampling_rate=AUDIOLDM_SAMPLE_RATE,
        upsample_initial_channel=16,
        upsample_rates=list(rates),
        upsample_kernel_sizes=[2 * r for r in rates],  # kernel = 2 * stride gives exactly len * stride samples
        resblock_kernel_sizes=[3],
        resblock_dilation_sizes=[[1, 3]],
        normalize_before=False,  # mean/scale buffers are only meaningful for a trained vocoder
    )
    return SpeechT5HifiGan(config)


def _audioldm_scheduler() -> DDIMScheduler:
    """AudioLDM's own DDIM schedule (AudioLDM2 uses the same one)."""
    return DDIMScheduler(
        num_train_timesteps=1000,
        beta_start=0.0015,
        beta_end=0.0195,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )


def build_tiny_audioldm() -> AudioLDMPipeline:
    """Tiny AudioLDMPipeline (mono, 16 kHz) for the deprecated-but-common AudioLDM path."""
    tokenizer = roberta_tokenizer()
    text_config = ClapTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=16,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=2,
        # RoBERTa-style positions start at pad_token_id + 1, so 77 tokens need 77 + 2 positions.
        max_position_embeddings=MODEL_MAX_LENGTH + 2,
        projection_dim=16,
        **tokenizer_ids(tokenizer),
    )
    text_encoder = ClapTextModelWithProjection(text_config)
    vae = tiny_vae(channels=1)
    block_out_channels = (16, 32)
    unet = UNet2DConditionModel(
        sample_size=16,  # default length 16 latent frames * 8 * 10 ms = 1.28 s
        in_channels=vae.config.latent_channels,
        out_channels=vae.config.latent_channels,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=block_out_channels,
        layers_per_block=1,
        norm_num_groups=8,
        attention_head_dim=8,
        # AudioLDM passes no encoder_hidden_states: its "cross" attention attends to the block itself,
        # so each block's cross_attention_dim equals its width; the text arrives as a class embedding.
        cross_attention_dim=block_out_channels,
        class_embed_type="simple_projection",
        projection_class_embeddings_input_dim=text_config.projection_dim,
        class_embeddings_concat=True,
    )
    return AudioLDMPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=_audioldm_scheduler(),
        vocoder=_audioldm_vocoder(),
    )


def build_tiny_audioldm2() -> AudioLDM2Pipeline:
    """Tiny AudioLDM2Pipeline (mono, 16 kHz): CLAP + T5 -> GPT-2 -> two-stream UNet, the current AudioLDM family."""
    tokenizer = roberta_tokenizer()
    tokenizer_2 = build_t5_tokenizer()
    clap_text = ClapTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=16,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=MODEL_MAX_LENGTH + 2,  # RoBERTa-style positions, see build_tiny_audioldm
        projection_dim=16,
        **tokenizer_ids(tokenizer),
    )
    # The audio tower only ranks candidates when num_waveforms_per_prompt > 1 (and librosa is installed),
    # but ClapModel always builds it: keep it minimal.
    clap_audio = ClapAudioConfig(
        spec_size=8,
        window_size=4,
        num_mel_bins=8,
        intermediate_size=37,
        depths=[1, 1],
        num_attention_heads=[1, 1],
        num_hidden_layers=1,
        hidden_size=16,
        projection_dim=16,
        patch_size=2,
        patch_stride=2,
        patch_embed_input_channels=4,
        patch_embeds_hidden_size=8,
    )
    text_encoder = ClapModel(
        ClapConfig(text_config=clap_text.to_dict(), audio_config=clap_audio.to_dict(), projection_dim=16)
    )
    text_encoder_2 = t5_encoder(tokenizer_2, width=32, ff_width=37, heads=2, activation="relu")
    # The language model is fed embeddings and read from its last hidden state: token ids and the LM head go
    # unused, so a tiny vocab suffices. max_new_tokens (in its config, as in AudioLDM2's checkpoints) is the
    # number of generated conditioning vectors.
    lm_dim = 16
    language_model = GPT2LMHeadModel(
        GPT2Config(
            n_embd=lm_dim,
            n_head=2,
            n_layer=2,
            n_positions=64,
            vocab_size=8,
            bos_token_id=0,
            eos_token_id=0,
            max_new_tokens=8,
        )
    )
    projection_model = AudioLDM2ProjectionModel(
        text_encoder_dim=clap_text.projection_dim,
        text_encoder_1_dim=text_encoder_2.config.d_model,
        langauge_model_dim=lm_dim,  # sic: diffusers' spelling
    )
    vae = tiny_vae(channels=1)
    # Per block: self-attention (None), cross-attention to the GPT-2 states, cross-attention to the T5 states.
    cross_attention_dim = [None, lm_dim, text_encoder_2.config.d_model]
    unet = AudioLDM2UNet2DConditionModel(
        sample_size=16,
        in_channels=vae.config.latent_channels,
        out_channels=vae.config.latent_channels,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(16, 32),
        layers_per_block=1,
        norm_num_groups=8,
        attention_head_dim=8,
        cross_attention_dim=(cross_attention_dim, cross_attention_dim),
    )
    vocoder = _audioldm_vocoder()
    feature_extractor = ClapFeatureExtractor(feature_size=clap_audio.num_mel_bins, sampling_rate=AUDIOLDM_SAMPLE_RATE)
    return AudioLDM2Pipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        projection_model=projection_model,
        language_model=language_model,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        feature_extractor=feature_extractor,
        unet=unet,
        scheduler=_audioldm_scheduler(),
        vocoder=vocoder,
    )


def build_tiny_stable_audio() -> StableAudioPipeline:
    """Tiny StableAudioPipeline (stereo, 24 kHz, up to 1.024 s) for the current StableAudio path."""
    tokenizer = build_t5_tokenizer()
    text_encoder = t5_encoder(tokenizer, width=16, ff_width=32, heads=2, activation="relu")
    latent_channels = 4
    vae = AutoencoderOobleck(
        encoder_hidden_size=2 * latent_channels,  # the encoder emits mean and scale
        downsampling_ratios=list(STABLE_AUDIO_RATIOS),
        channel_multiples=[1, 2, 4],
        decoder_channels=8,
        decoder_input_channels=latent_channels,
        audio_channels=2,
        sampling_rate=STABLE_AUDIO_SAMPLE_RATE,
    )
    conditioning_dim = 16
    projection_model = StableAudioProjectionModel(
        text_encoder_dim=text_encoder.config.d_model,
        conditioning_dim=conditioning_dim,
        min_value=0,
        max_value=512,  # Stable Audio Open's bounds for the start/end seconds conditioning
    )
    transformer = StableAudioDiTModel(
        sample_size=STABLE_AUDIO_LATENT_FRAMES,
        in_channels=latent_channels,
        out_channels=latent_channels,
        num_layers=2,
        attention_head_dim=8,  # rotary embedding covers half of it
        num_attention_heads=2,
        num_key_value_attention_heads=1,
        cross_attention_dim=16,
        time_proj_dim=16,
        global_states_input_dim=2 * conditioning_dim,  # start and end seconds, concatenated
        cross_attention_input_dim=conditioning_dim,
    )
    scheduler = CosineDPMSolverMultistepScheduler(  # Stable Audio Open's scheduler config
        sigma_min=0.3,
        sigma_max=500.0,
        sigma_data=1.0,
        sigma_schedule="exponential",
        solver_order=2,
        prediction_type="v_prediction",
        rho=7.0,
        final_sigmas_type="zero",
    )
    return StableAudioPipeline(
        vae=vae,
        text_encoder=text_encoder,
        projection_model=projection_model,
        tokenizer=tokenizer,
        transformer=transformer,
        scheduler=scheduler,
    )


def audio_entry(**defaults: Any) -> dict[str, Any]:
    """A text-to-audio catalog entry with 2-step tiny defaults plus the family's own length argument."""
    return {"kind": "pipeline", "tasks": ["audio"], "defaults": {"num_inference_steps": 2, **defaults}}


AUDIO_MODELS: dict[str, TinySpec] = {
    "tiny-audioldm": TinySpec(
        save_pipeline(seeded(build_tiny_audioldm)),
        audio_entry(guidance_scale=2.5, audio_length_in_s=1.0),
    ),
    "tiny-audioldm2": TinySpec(
        save_pipeline(seeded(build_tiny_audioldm2)),
        audio_entry(guidance_scale=3.5, audio_length_in_s=1.0),
    ),
    "tiny-stable-audio": TinySpec(
        save_pipeline(seeded(build_tiny_stable_audio)),
        audio_entry(guidance_scale=7.0, audio_end_in_s=1.0),
    ),
}
"""Name -> spec for every tiny audio model; the name is also its directory and catalog key."""
