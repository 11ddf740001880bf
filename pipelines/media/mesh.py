"""Mesh outputs: Shap-E ``output_type="mesh"`` results to trimesh meshes, files and previews.

``ShapEPipeline`` / ``ShapEImg2ImgPipeline`` called with ``output_type="mesh"`` return,
in ``.images``, one ``MeshDecoderOutput`` per latent (``batch size x
num_images_per_prompt``): ``verts`` (N, 3) float, ``faces`` (M, 3) long and
``vertex_channels`` ``{"R", "G", "B"}`` -> (N,) floats in [0, 1].  This module turns
those into ``trimesh.Trimesh`` meshes with vertex colours, encodes them as GLB, PLY
or OBJ (with renderfleet's metadata embedded), and draws a PNG preview in software
(matplotlib's Agg backend: these machines have no OpenGL).

Conventions:

* Colours are written as the pipeline gives them (value x 255), as diffusers' own
  ``export_to_ply`` / ``export_to_obj`` do, so files match diffusers' exports.
* Shap-E meshes are Z-up; PLY and OBJ keep that, while GLB is rotated to glTF's
  Y-up (the rotation diffusers' docs apply before exporting GLB).
"""

from __future__ import annotations

import io
import json
from collections.abc import Sequence
from typing import Any

import numpy as np
import trimesh
from PIL import Image
from trimesh.exchange import gltf, obj, ply

from pipelines.media.formats import FORMATS, TASK_FORMATS

__all__ = ["MESH_FORMATS", "encode_mesh", "meshes_from_output", "preview_png"]

MESH_FORMATS = TASK_FORMATS["mesh"]
"""Output formats encode_mesh writes; the first is the default for galleries and viewers."""

_COLOUR_CHANNELS = ("R", "G", "B")
_Z_UP_TO_Y_UP = trimesh.transformations.rotation_matrix(-np.pi / 2, [1.0, 0.0, 0.0])
"""Rotation taking Shap-E's +Z up to glTF's +Y up: (x, y, z) -> (x, z, -y)."""

_EXTRAS_TAG = "renderfleet-extras"
"""Prefix of the comment line that carries extras in PLY and OBJ, which have no metadata fields."""


def _to_numpy(value: Any) -> np.ndarray:
    """Tensor or array-like to a NumPy array, without importing torch here."""
    if hasattr(value, "detach"):
        value = value.detach().cpu().float() if value.is_floating_point() else value.detach().cpu()
        return value.numpy()
    return np.asarray(value)


def _mesh_list(output_images: Any) -> list[Any]:
    """The per-latent mesh list, whether given the pipeline output, its tuple form, a list or one mesh."""
    if hasattr(output_images, "images"):
        output_images = output_images.images
    if isinstance(output_images, tuple) and len(output_images) == 1 and isinstance(output_images[0], list):
        output_images = output_images[0]
    if hasattr(output_images, "verts"):
        return [output_images]
    if not isinstance(output_images, Sequence) or not all(hasattr(m, "verts") for m in output_images):
        raise TypeError(
            'expected ShapE output_type="mesh" results (MeshDecoderOutput with verts, faces, vertex_channels), '
            f"got {type(output_images).__name__}"
        )
    return list(output_images)


def _vertex_colours(channels: dict[str, Any] | None, count: int) -> np.ndarray | None:
    """RGBA uint8 vertex colours from Shap-E's per-channel floats in [0, 1], or None when absent."""
    if not channels or not all(c in channels for c in _COLOUR_CHANNELS):
        return None
    rgb = np.stack([_to_numpy(channels[c]).reshape(-1) for c in _COLOUR_CHANNELS], axis=1)
    if rgb.shape[0] != count:
        raise ValueError(f"vertex_channels have {rgb.shape[0]} values for {count} vertices")
    rgba = np.full((count, 4), 255, dtype=np.uint8)
    rgba[:, :3] = np.clip(np.round(rgb * 255.0), 0, 255).astype(np.uint8)
    return rgba


def meshes_from_output(output_images: Any, batch_size: int) -> list[trimesh.Trimesh]:
    """One trimesh mesh (with vertex colours) per input, so callers split a batched call per row.

    ``output_images`` is the pipeline's ``.images`` (or the output object itself, or
    the ``return_dict=False`` tuple).  Vertices and faces are kept exactly as
    decoded (no merging), so counts match the pipeline's.  Raises ValueError when
    the number of meshes is not ``batch_size`` (e.g. ``num_images_per_prompt`` > 1).
    """
    decoded = _mesh_list(output_images)
    if len(decoded) != batch_size:
        raise ValueError(f"expected {batch_size} meshes (one per input), got {len(decoded)}")
    meshes = []
    for item in decoded:
        vertices = _to_numpy(item.verts).astype(np.float64).reshape(-1, 3)
        faces = _to_numpy(item.faces).astype(np.int64).reshape(-1, 3)
        colours = _vertex_colours(getattr(item, "vertex_channels", None), len(vertices))
        meshes.append(trimesh.Trimesh(vertices=vertices, faces=faces, vertex_colors=colours, process=False))
    return meshes


def _checked_extras(extras: dict[str, Any] | None) -> dict[str, Any] | None:
    """Extras round-tripped through JSON, so a non-serialisable value fails here with a clear error."""
    if not extras:
        return None
    try:
        return json.loads(json.dumps(extras, allow_nan=False))
    except (TypeError, ValueError) as error:
        raise ValueError(f"mesh extras must be JSON-serialisable: {error}") from error


def _encode_glb(mesh: trimesh.Trimesh, extras: dict[str, Any] | None) -> bytes:
    """Binary glTF, Y-up, with vertex normals (smooth shading in viewers) and extras in ``asset.extras``."""
    upright = mesh.copy()
    upright.apply_transform(_Z_UP_TO_Y_UP)

    def add_extras(tree: dict[str, Any]) -> None:
        """Puts renderfleet's metadata where glTF tools look for asset-level application data."""
        if extras:
            tree["asset"]["extras"] = extras

    return gltf.export_glb(
        trimesh.Scene(upright), include_normals=True, tree_postprocessor=add_extras
    )


def _encode_ply(mesh: trimesh.Trimesh, extras: dict[str, Any] | None) -> bytes:
    """Binary little-endian PLY with RGBA vertex colours; extras as one header comment line."""
    data = ply.export_ply(mesh, encoding="binary", include_attributes=False)
    if not extras:
        return data
    first_line_end = data.index(b"\n", data.index(b"format")) + 1
    comment = f"comment {_EXTRAS_TAG} {json.dumps(extras, ensure_ascii=True)}\n".encode("ascii")
    return data[:first_line_end] + comment + data[first_line_end:]


def _encode_obj(mesh: trimesh.Trimesh, extras: dict[str, Any] | None) -> bytes:
    """Wavefront OBJ with per-vertex colours (``v x y z r g b``); extras as one ``#`` comment line."""
    text = obj.export_obj(mesh, include_normals=False, include_color=True, include_texture=False)
    if extras:
        text = f"# {_EXTRAS_TAG} {json.dumps(extras, ensure_ascii=True)}\n{text}"
    return text.encode("utf-8")


_ENCODERS = {"glb": _encode_glb, "ply": _encode_ply, "obj": _encode_obj}


def encode_mesh(
    mesh: trimesh.Trimesh, output_format: str, extras: dict[str, Any] | None = None
) -> tuple[bytes, str, str]:
    """Returns (bytes, extension, content type), like encode_image, so mesh rows are stored the same way.

    ``extras`` (JSON-serialisable: prompt, seed, model, ...) goes into glTF's
    ``asset.extras`` for GLB, and into a ``renderfleet-extras {json}`` comment line
    for PLY (header) and OBJ (first line).
    """
    if output_format not in _ENCODERS:
        raise ValueError(f"unknown mesh format {output_format!r}; expected one of {', '.join(MESH_FORMATS)}")
    data = _ENCODERS[output_format](mesh, _checked_extras(extras))
    fmt = FORMATS[output_format]
    return data, fmt.extension, fmt.mime


def _face_colours(mesh: trimesh.Trimesh) -> np.ndarray:
    """Per-face RGB in [0, 1]: the mean of its vertices' colours (grey when the mesh has none)."""
    if mesh.visual.kind == "vertex":
        vertex_rgb = np.asarray(mesh.visual.vertex_colors, dtype=np.float64)[:, :3] / 255.0
        return vertex_rgb[mesh.faces].mean(axis=1)
    return np.full((len(mesh.faces), 3), 0.7)


def preview_png(mesh: trimesh.Trimesh, size: int = 256) -> bytes:
    """A size x size PNG of the mesh, Lambert-shaded in software, for galleries (no OpenGL on render nodes).

    The view is Shap-E's upright (Z up), from slightly above; an empty mesh gives a
    plain white image rather than an error.
    """
    if size < 16:
        raise ValueError(f"preview size must be at least 16 pixels, got {size}")
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from mpl_toolkits.mplot3d.art3d import Poly3DCollection

    dpi = 100
    figure = Figure(figsize=(size / dpi, size / dpi), dpi=dpi, facecolor="white")
    canvas = FigureCanvasAgg(figure)
    axes = figure.add_axes((0.0, 0.0, 1.0, 1.0), projection="3d")
    axes.set_axis_off()
    elevation, azimuth = 20.0, -60.0
    axes.view_init(elev=elevation, azim=azimuth)
    axes.set_proj_type("ortho")  # Exact back-face culling below needs a parallel projection.
    if len(mesh.faces):
        el, az = np.radians(elevation), np.radians(azimuth)
        towards_viewer = np.array([np.cos(el) * np.cos(az), np.cos(el) * np.sin(az), np.sin(el)])
        light = towards_viewer + np.array([0.0, 0.0, 0.6])
        light /= np.linalg.norm(light)
        normals = mesh.face_normals
        visible = np.ones(len(mesh.faces), dtype=bool)
        if mesh.is_watertight and mesh.is_winding_consistent:
            # A closed, consistently wound mesh never shows its back faces: skip them (half the drawing time).
            visible = normals @ towards_viewer >= 0.0 if mesh.volume > 0 else normals @ towards_viewer <= 0.0
        lambert = np.abs(normals[visible] @ light)
        shade = (0.35 + 0.65 * lambert)[:, None]
        colours = np.clip(_face_colours(mesh)[visible] * shade, 0.0, 1.0)
        polygons = Poly3DCollection(
            mesh.vertices[mesh.faces[visible]], facecolors=colours, edgecolors=colours, linewidths=0.2
        )
        axes.add_collection3d(polygons)
        centre = mesh.bounds.mean(axis=0)
        half = max(float(np.ptp(mesh.bounds, axis=0).max()) / 2.0, 1e-6)
        axes.set_xlim(centre[0] - half, centre[0] + half)
        axes.set_ylim(centre[1] - half, centre[1] + half)
        axes.set_zlim(centre[2] - half, centre[2] + half)
        axes.set_box_aspect((1.0, 1.0, 1.0), zoom=1.2)
    canvas.draw()
    image = Image.frombuffer("RGBA", canvas.get_width_height(), canvas.buffer_rgba(), "raw", "RGBA", 0, 1)
    image = image.convert("RGB")
    if image.size != (size, size):  # Figure sizes are in inches; guard against rounding to size +- 1.
        image = image.resize((size, size), Image.Resampling.LANCZOS)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()
