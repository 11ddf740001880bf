"""Tiny random-weight Shap-E (text-to-3D and image-to-3D) pipelines, built fully offline.

The 3D counterpart of :mod:`pipelines.tiny.sd`: small, deterministic pipelines that load
through the ordinary ``DiffusionPipeline.from_pretrained(dir)`` path, so mesh
rendering is tested end to end without Hub access.

Families:

* ``tiny-shap-e``: ``ShapEPipeline``: CLIP text encoder with projection + a locally
  built CLIP tokenizer, a ``PriorTransformer``, the ``HeunDiscreteScheduler`` that
  Shap-E ships with, and a ``ShapERenderer``.
* ``tiny-shap-e-img2img``: ``ShapEImg2ImgPipeline``: ``CLIPVisionModel`` +
  ``CLIPImageProcessor`` (32x32 crops) instead of the text side; same prior and
  renderer design.

Two things a random-weight renderer gets wrong, fixed here in the saved weights
(nothing is special-cased at load time):

* ``MeshDecoder``'s marching-cubes lookup table (the ``cases``/``masks`` buffers)
  is all zeros in a fresh renderer; real checkpoints carry it.  It is generated
  here from the cube's topology (:mod:`pipelines.tiny.marching_cubes`), with one consistent
  rule for ambiguous faces, so every mesh it produces is closed and consistently
  wound.
* A random MLP gives a noise SDF (million-vertex meshes).  The renderer's MLP is
  set so that its signed distance is a fixed sphere of radius ``SPHERE_RADIUS``
  whatever the latent, while its colours still depend on the latent (so prompts,
  images and seeds still change the output).

``ShapERenderer.decode_to_mesh`` always samples a 128^3 grid (the pipelines do not
pass ``grid_size`` and the renderer has no config for it), so one mesh costs a few
seconds on one CPU thread whatever the model size.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import HeunDiscreteScheduler, PriorTransformer, ShapEImg2ImgPipeline, ShapEPipeline
from diffusers.pipelines.shap_e.renderer import ShapERenderer
from transformers import (
    CLIPImageProcessor,
    CLIPTextModelWithProjection,
    CLIPVisionConfig,
    CLIPVisionModel,
)

from pipelines.tiny.common import TinySpec, clip_text_config, clip_tokenizer, save_pipeline, seeded
from pipelines.tiny.marching_cubes import marching_cubes_table

__all__ = [
    "MESH_MODELS",
    "SPHERE_RADIUS",
    "build_tiny_shap_e",
    "build_tiny_shap_e_img2img",
    "mesh_entry",
]

SPHERE_RADIUS = 0.35
"""Radius of the tiny renderer's sphere, inside its [-1, 1]^3 box: ~10k vertices on the fixed 128^3 grid."""

IMAGE_SIZE = 32
"""The tiny image encoder's input size (crop and resize target of its image processor)."""

RENDERER_WIDTH = 8
"""Hidden width of the renderer MLP; one latent token per row of each projected weight."""

LATENT_DIM = 16
"""Width of each latent token (the prior's ``embedding_dim``, the renderer's ``d_latent``)."""

TEXT_WIDTH = 32
"""Width of the CLIP text/vision encoders; also the prior's conditioning width."""

_PROJECTED_LAYERS = 4
"""Shap-E's renderer takes the weights of its first four MLP layers from the latent."""

_N_HIDDEN_LAYERS = 6
_INSERT_DIRECTION_AT = 4
_POSENC_DIM = 93
"""Shap-E's position encoding width: xyz plus sin/cos at 15 octaves (3 + 2 * 3 * 15)."""

_DIRENC_DIM = 51
"""Direction encoding width: xyz plus sin/cos at 8 octaves (3 + 2 * 3 * 8)."""

_SHIFT = 20.0
"""Added to values carried through SiLU layers: silu(z) = z to 4e-8 for z >= 20, so they pass unchanged."""

_SDF_SCALE = 4.0
"""SDF output scale before the renderer's tanh: near-linear at the surface, so vertex interpolation is accurate."""

_DENSITY_SCALE = 200.0
"""Density inside the sphere for the NeRF (image) path: opaque within a few hundredths of a unit."""

_COLOUR_ROWS = (1, 2, 3)
"""First-layer rows whose weights depend on the latent; they drive the R, G, B outputs."""

_COLOUR_INPUTS = (0, 1, 2, 3, 4, 5, 48, 49, 50)
"""Encoded-position features colours may use: xyz, sin and cos at the base octave (smooth on the sphere)."""

_DEFAULTS: dict[str, Any] = {"num_inference_steps": 2, "guidance_scale": 3.0, "frame_size": 32}


def _sphere_mlp(radius: float) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Weights and biases of the renderer MLP (7 layers, RENDERER_WIDTH wide) whose SDF is a sphere.

    Row 0 of layer 0 computes |x|^2 (+ _SHIFT) from the cos features of the
    position encoding: x^2 = (15 - 16 cos x + cos 2x) / 6 + x^6/90 + ... (under 0.02%
    of r^2 at r = 0.35).  Later layers carry it through unchanged; the last layer
    outputs sdf = s (r^2 - |x|^2) (positive inside, as MeshDecoder expects),
    densities K (r^2 - |x|^2) and colours from rows _COLOUR_ROWS.  Layer-0 colour
    rows are left zero here: their weights come from the latent.
    """
    width = RENDERER_WIDTH
    in_widths = [_POSENC_DIM] + [width] * _N_HIDDEN_LAYERS
    in_widths[_INSERT_DIRECTION_AT] += _DIRENC_DIM
    out_widths = [width] * _N_HIDDEN_LAYERS + [12]
    weights = [torch.zeros(o, i) for i, o in zip(in_widths, out_widths)]
    biases = [torch.zeros(o) for o in out_widths]
    cos_x = [48, 49, 50]  # cos(2^0 x_i): encoded index 3 + 45 + 3k + i at k = 0
    cos_2x = [51, 52, 53]  # k = 1
    weights[0][0, cos_x] = -16.0 / 6.0
    weights[0][0, cos_2x] = 1.0 / 6.0
    biases[0][0] = 3 * 15.0 / 6.0 + _SHIFT
    for layer in range(1, _N_HIDDEN_LAYERS):
        weights[layer][:, :width] = torch.eye(width)
    biases[1][list(_COLOUR_ROWS)] = _SHIFT  # colour rows are shifted after their first SiLU
    last_w, last_b = weights[-1], biases[-1]
    # Output layout (MLPNeRSTFModel.map_indices_to_keys): sdf 0, density 1-2, stf 3-5, nerf 6-8 and 9-11.
    for row, scale in ((0, _SDF_SCALE), (1, _DENSITY_SCALE), (2, _DENSITY_SCALE)):
        last_w[row, 0] = -scale
        last_b[row] = scale * (radius**2 + _SHIFT)
    for channel, hidden in enumerate(_COLOUR_ROWS):
        for offset in (3, 6, 9):
            last_w[offset + channel, hidden] = 2.0
            last_b[offset + channel] = -2.0 * _SHIFT + 0.5
    return weights, biases


def _sphere_renderer(radius: float = SPHERE_RADIUS) -> ShapERenderer:
    """A ShapERenderer whose mesh is a fixed sphere with latent-dependent colours, and a real marching-cubes table."""
    width = RENDERER_WIDTH
    param_shapes = ((width, _POSENC_DIM),) + ((width, width),) * (_PROJECTED_LAYERS - 1)
    renderer = ShapERenderer(
        param_names=tuple(f"nerstf.mlp.{i}.weight" for i in range(_PROJECTED_LAYERS)),
        param_shapes=param_shapes,
        d_latent=LATENT_DIM,
        d_hidden=width,
        n_output=12,
        n_hidden_layers=_N_HIDDEN_LAYERS,
        act_fn="swish",
        insert_direction_at=_INSERT_DIRECTION_AT,
        background=(255.0, 255.0, 255.0),
    )
    weights, biases = _sphere_mlp(radius)
    colour_mask = torch.zeros(_POSENC_DIM)
    colour_mask[list(_COLOUR_INPUTS)] = 1.0
    with torch.no_grad():
        for layer, (weight, bias) in enumerate(zip(weights, biases)):
            renderer.mlp.mlp[layer].weight.copy_(weight)
            renderer.mlp.mlp[layer].bias.copy_(bias)
        for layer in range(_PROJECTED_LAYERS):
            # ChannelsProj: W[v] = LayerNorm(latent[v] @ P[v]) * gamma + beta + bias[v].  A zero P row
            # gives exactly bias[v] (LayerNorm of zeros is zero), so those rows are fixed constants.
            proj = renderer.params_proj.projections[f"nerstf__mlp__{layer}__weight"]
            vectors, channels = param_shapes[layer]
            proj_weight = torch.zeros(vectors, channels, LATENT_DIM)
            norm_weight = torch.zeros(channels)
            if layer == 0:
                proj_weight[list(_COLOUR_ROWS)] = torch.randn(len(_COLOUR_ROWS), channels, LATENT_DIM)
                norm_weight = 1.5 * colour_mask
            proj.proj.weight.copy_(proj_weight.reshape(vectors * channels, LATENT_DIM))
            proj.proj.bias.copy_(weights[layer].reshape(-1))
            proj.norm.weight.copy_(norm_weight)
            proj.norm.bias.zero_()
        cases, masks = marching_cubes_table()
        renderer.mesh_decoder.cases.copy_(cases)
        renderer.mesh_decoder.masks.copy_(masks)
    return renderer


def _prior(conditioning_width: int) -> PriorTransformer:
    """Shap-E's prior layout (no prd token, layer norms, Gelu time embedding), one 16-wide layer."""
    return PriorTransformer(
        num_attention_heads=2,
        attention_head_dim=8,
        num_layers=1,
        embedding_dim=LATENT_DIM,
        num_embeddings=RENDERER_WIDTH * _PROJECTED_LAYERS,
        additional_embeddings=0,
        time_embed_act_fn="gelu",
        norm_in_type="layer",
        embedding_proj_norm_type="layer",
        encoder_hid_proj_type=None,
        added_emb_type=None,
        time_embed_dim=32,
        embedding_proj_dim=conditioning_width,
        clip_embed_dim=2 * LATENT_DIM,  # mean and variance; the pipelines drop the second half
    )


def _scheduler() -> HeunDiscreteScheduler:
    """The scheduler config Shap-E ships with (x0-prediction, exp betas, Karras sigmas)."""
    return HeunDiscreteScheduler(
        num_train_timesteps=1024,
        beta_schedule="exp",
        prediction_type="sample",
        use_karras_sigmas=True,
        clip_sample=True,
        clip_sample_range=1.0,
    )


@seeded
def build_tiny_shap_e() -> ShapEPipeline:
    """Tiny text-to-3D ShapEPipeline whose renderer meshes a sphere (colours depend on prompt and seed)."""
    tokenizer = clip_tokenizer()
    config = clip_text_config(tokenizer, hidden_size=TEXT_WIDTH, projection_dim=TEXT_WIDTH)
    return ShapEPipeline(
        prior=_prior(TEXT_WIDTH),
        text_encoder=CLIPTextModelWithProjection(config),
        tokenizer=tokenizer,
        scheduler=_scheduler(),
        shap_e_renderer=_sphere_renderer(),
    )


@seeded
def build_tiny_shap_e_img2img() -> ShapEImg2ImgPipeline:
    """Tiny image-to-3D ShapEImg2ImgPipeline (32x32 CLIP vision input) with the same sphere renderer."""
    vision = CLIPVisionModel(
        CLIPVisionConfig(
            hidden_size=TEXT_WIDTH,
            intermediate_size=37,
            projection_dim=TEXT_WIDTH,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_channels=3,
            image_size=IMAGE_SIZE,
            patch_size=8,
            hidden_act="gelu",
        )
    )
    processor = CLIPImageProcessor(
        do_resize=True,
        size={"shortest_edge": IMAGE_SIZE},
        resample=3,
        do_center_crop=True,
        crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        do_normalize=True,
        image_mean=[0.48145466, 0.4578275, 0.40821073],
        image_std=[0.26862954, 0.26130258, 0.27577711],
        do_convert_rgb=True,
    )
    return ShapEImg2ImgPipeline(
        prior=_prior(TEXT_WIDTH),
        image_encoder=vision,
        image_processor=processor,
        scheduler=_scheduler(),
        shap_e_renderer=_sphere_renderer(),
    )


def mesh_entry(**extra: Any) -> dict[str, Any]:
    """A text/image-to-3D catalog entry with the tiny defaults (frame_size only matters for image output)."""
    return {"kind": "pipeline", "tasks": ["mesh"], "defaults": dict(_DEFAULTS), **extra}


MESH_MODELS: dict[str, TinySpec] = {
    "tiny-shap-e": TinySpec(save_pipeline(build_tiny_shap_e), mesh_entry()),
    "tiny-shap-e-img2img": TinySpec(save_pipeline(build_tiny_shap_e_img2img), mesh_entry()),
}
"""Name -> spec for the tiny 3D models; the name is also its directory and catalog key."""
