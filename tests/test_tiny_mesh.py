"""Tests for pipelines.tiny.mesh and pipelines.media.mesh: tiny Shap-E pipelines rendered to GLB/PLY/OBJ and previews.

Each family is built once, loaded through the plain ``DiffusionPipeline.from_pretrained``
path and rendered once (2 inputs in one call, one generator per input); every other
test reuses those meshes, since one Shap-E mesh costs a few seconds on one thread
(``decode_to_mesh`` always samples a 128^3 grid).
"""

from __future__ import annotations

import hashlib
import inspect
import io
import json
import math
import struct
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import trimesh
from diffusers import DiffusionPipeline, ShapEImg2ImgPipeline, ShapEPipeline
from diffusers.pipelines.shap_e.renderer import MeshDecoder
from PIL import Image

from helpers import load_pipeline
from pipelines.loading import quiet_hf_progress
from pipelines.media.mesh import MESH_FORMATS, encode_mesh, meshes_from_output, preview_png
from pipelines.tiny import write_spec
from pipelines.tiny.marching_cubes import marching_cubes_table
from pipelines.tiny.mesh import MESH_MODELS, SPHERE_RADIUS

pytestmark = [pytest.mark.timeout(300), pytest.mark.usefixtures("one_torch_thread")]

EXPECTED_CLASSES = {"tiny-shap-e": ShapEPipeline, "tiny-shap-e-img2img": ShapEImg2ImgPipeline}
PROMPTS = ["a cat and the thing", "a red chair"]
SEEDS = [11, 12]
EXTRAS = {"model": "tiny-shap-e", "prompt": "a cät", "seed": 11, "steps": 2}
MAX_VERTICES = 50_000
# decode_to_mesh samples a 128^3 grid, pads it to 130^3 and maps the padded grid onto the box, so every
# Shap-E mesh comes out scaled by 127/129 about the centre (a diffusers quirk, real checkpoints too).
DECODED_RADIUS = SPHERE_RADIUS * 127 / 129


@dataclass
class Render:
    """One family's single two-input call, split per input."""

    pipe: DiffusionPipeline
    output: Any
    meshes: list[trimesh.Trimesh]
    seconds: float


@pytest.fixture(scope="module")
def mesh_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Builds every mesh model once for the module."""
    quiet_hf_progress()
    root = tmp_path_factory.mktemp("tiny-mesh-models")
    for name in MESH_MODELS:
        write_spec(MESH_MODELS[name], root / name)
    return root


def _inputs(pipe: DiffusionPipeline) -> dict[str, Any]:
    """Two prompts, or two small images.

    ShapEImg2ImgPipeline encodes only the first image of a list of PIL images
    (``pixel_values[0]`` in ``_encode_image``), so batches go in as the tensor its
    own image processor makes.
    """
    if isinstance(pipe, ShapEImg2ImgPipeline):
        images = [Image.new("RGB", (40, 48), (220, 40, 40)), Image.new("RGB", (48, 40), (30, 60, 200))]
        return {"image": pipe.image_processor(images, return_tensors="pt").pixel_values}
    return {"prompt": PROMPTS}


@pytest.fixture(scope="module")
def renders(mesh_root: Path) -> dict[str, Render]:
    """Loads each family through from_pretrained and renders 2 inputs in one call with the catalog defaults."""
    results = {}
    for name, spec in MESH_MODELS.items():
        pipe = load_pipeline(mesh_root / name)
        generators = [torch.Generator("cpu").manual_seed(s) for s in SEEDS]
        start = time.perf_counter()
        output = pipe(**_inputs(pipe), generator=generators, output_type="mesh", **spec.entry["defaults"])
        seconds = time.perf_counter() - start
        results[name] = Render(pipe, output, meshes_from_output(output.images, len(SEEDS)), seconds)
        print(f"{name}: 2 meshes in {seconds:.1f} s, {[len(m.vertices) for m in results[name].meshes]} vertices")
    return results


def _sha256(path: Path) -> str:
    """Content hash of one file, to compare builds."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _glb_json(data: bytes) -> dict[str, Any]:
    """The JSON chunk of a GLB file, parsed by hand as any glTF reader would."""
    magic, version, length = struct.unpack_from("<4sII", data, 0)
    assert (magic, version, length) == (b"glTF", 2, len(data))
    chunk_length, chunk_type = struct.unpack_from("<I4s", data, 12)
    assert chunk_type == b"JSON"
    return json.loads(data[20 : 20 + chunk_length])


def _comment_extras(data: bytes, prefix: bytes) -> dict[str, Any]:
    """The extras JSON from the renderfleet comment line of a PLY header or OBJ file."""
    head = data[: data.find(b"end_header")] if prefix == b"comment" else data[:4096]
    for line in head.split(b"\n"):
        if line.startswith(prefix + b" renderfleet-extras "):
            return json.loads(line.split(b" ", 2)[2])
    raise AssertionError("no renderfleet-extras line")


def test_registry_entries() -> None:
    assert set(MESH_MODELS) == set(EXPECTED_CLASSES)
    for name, spec in MESH_MODELS.items():
        assert spec.write is not None
        assert spec.entry["kind"] == "pipeline" and spec.entry["tasks"] == ["mesh"]
        assert "source" not in spec.entry
        accepted = inspect.signature(EXPECTED_CLASSES[name].__call__).parameters
        assert set(spec.entry["defaults"]) <= set(accepted), name


@pytest.mark.parametrize("name", sorted(EXPECTED_CLASSES))
def test_loads_as_right_class_with_table_in_safetensors(name: str, mesh_root: Path, renders: dict[str, Render]) -> None:
    pipe = renders[name].pipe
    assert type(pipe) is EXPECTED_CLASSES[name]
    model_dir = mesh_root / name
    assert list(model_dir.rglob("*.safetensors"))
    assert not [p for p in model_dir.rglob("*") if p.suffix in (".bin", ".pt", ".pth", ".ckpt")]
    cases, masks = marching_cubes_table()
    decoder = pipe.shap_e_renderer.mesh_decoder
    assert torch.equal(decoder.cases, cases) and torch.equal(decoder.masks, masks)
    size = sum(p.stat().st_size for p in model_dir.rglob("*") if p.is_file())
    print(f"{name}: {size / 1024:.0f} KiB on disk")
    assert size < 2 * 1024 * 1024


@pytest.mark.parametrize("name", sorted(EXPECTED_CLASSES))
def test_build_is_deterministic(name: str, mesh_root: Path, tmp_path: Path) -> None:
    again = write_spec(MESH_MODELS[name], tmp_path / name)
    for weights in sorted((mesh_root / name).rglob("*.safetensors")):
        assert _sha256(weights) == _sha256(again / weights.relative_to(mesh_root / name)), weights


def test_marching_cubes_table_gives_closed_outward_meshes() -> None:
    cases, masks = marching_cubes_table()
    assert cases.shape == (256, 5, 3) and masks.shape == (256, 5)
    assert not masks[0].any() and not masks[255].any()
    assert masks[1].sum() == 1 and masks.sum(dim=1).max() == 5
    decoder = MeshDecoder()
    decoder.cases.copy_(cases)
    decoder.masks.copy_(masks)
    generator = torch.Generator("cpu").manual_seed(0)
    coarse = torch.randn(1, 1, 6, 6, 6, generator=generator)
    smooth = torch.nn.functional.interpolate(coarse, size=(24, 24, 24), mode="trilinear")[0, 0]
    rough = torch.randn(10, 10, 10, generator=generator)  # every case, ambiguous faces included
    for values in (smooth, rough):
        values[[0, -1]] = values[:, [0, -1]] = values[:, :, [0, -1]] = -1.0  # closed off, as decode_to_mesh does
        out = decoder(values, torch.full((3,), -1.0), torch.full((3,), 2.0))
        mesh = trimesh.Trimesh(out.verts.numpy(), out.faces.numpy(), process=False)
        assert len(mesh.faces) > 0
        assert mesh.is_watertight and mesh.is_winding_consistent
        assert mesh.volume > 0  # normals point out of the positive (inside) region


@pytest.mark.parametrize("name", sorted(EXPECTED_CLASSES))
def test_renders_one_watertight_sphere_per_input(name: str, renders: dict[str, Render]) -> None:
    render = renders[name]
    assert len(render.output.images) == len(SEEDS)
    first, second = render.meshes
    for mesh in render.meshes:
        assert 0 < len(mesh.vertices) < MAX_VERTICES and len(mesh.faces) > 0
        assert mesh.is_watertight and mesh.is_winding_consistent
        radii = np.linalg.norm(mesh.vertices, axis=1)
        assert abs(radii.mean() - DECODED_RADIUS) < 0.005 and np.ptp(radii) < 0.02
        assert mesh.volume == pytest.approx(4 / 3 * math.pi * DECODED_RADIUS**3, rel=0.03)
        assert mesh.visual.kind == "vertex"
    # Same sphere, but colours come from the latent: each input/seed gets its own.
    assert np.array_equal(first.vertices, second.vertices)
    assert not np.array_equal(first.visual.vertex_colors, second.visual.vertex_colors)


@pytest.mark.parametrize("output_format", MESH_FORMATS)
@pytest.mark.parametrize("name", sorted(EXPECTED_CLASSES))
def test_encodes_and_reads_back(name: str, output_format: str, renders: dict[str, Render]) -> None:
    for mesh in renders[name].meshes:
        data, ext, content_type = encode_mesh(mesh, output_format, EXTRAS)
        assert ext == output_format and content_type
        loaded = trimesh.load(io.BytesIO(data), file_type=ext, force="mesh", process=False)
        assert len(loaded.faces) == len(mesh.faces) > 0
        assert len(loaded.vertices) == len(mesh.vertices)
        assert loaded.is_watertight
        assert loaded.volume == pytest.approx(mesh.volume, rel=1e-4)
        assert loaded.visual.kind == "vertex"
        colour_error = np.abs(loaded.visual.vertex_colors.astype(int) - mesh.visual.vertex_colors.astype(int))
        assert colour_error.max() <= 1
        if ext == "glb":
            assert content_type == "model/gltf-binary"
            assert _glb_json(data)["asset"]["extras"] == EXTRAS
        else:
            assert _comment_extras(data, b"comment" if ext == "ply" else b"#") == EXTRAS


def test_glb_is_y_up_and_other_formats_keep_z_up() -> None:
    tall = trimesh.creation.box(extents=(0.2, 0.4, 1.0))  # Shap-E's up axis is +Z
    glb = trimesh.load(io.BytesIO(encode_mesh(tall, "glb")[0]), file_type="glb", force="mesh")
    ply = trimesh.load(io.BytesIO(encode_mesh(tall, "ply")[0]), file_type="ply", force="mesh")
    assert np.ptp(glb.bounds, axis=0) == pytest.approx([0.2, 1.0, 0.4])
    assert np.ptp(ply.bounds, axis=0) == pytest.approx([0.2, 0.4, 1.0])
    assert "extras" not in _glb_json(encode_mesh(tall, "glb")[0])["asset"]


def test_encode_rejects_unknown_format_and_bad_extras(renders: dict[str, Render]) -> None:
    mesh = renders["tiny-shap-e"].meshes[0]
    with pytest.raises(ValueError, match="unknown mesh format"):
        encode_mesh(mesh, "stl")
    with pytest.raises(ValueError, match="JSON"):
        encode_mesh(mesh, "glb", {"seed": object()})


def test_meshes_from_output_forms_and_count(renders: dict[str, Render]) -> None:
    output = renders["tiny-shap-e"].output
    from_object = meshes_from_output(output, 2)
    from_tuple = meshes_from_output((output.images,), 2)
    assert [len(m.faces) for m in from_object] == [len(m.faces) for m in from_tuple]
    assert len(meshes_from_output(output.images[0], 1)) == 1
    with pytest.raises(ValueError, match="expected 3 meshes"):
        meshes_from_output(output.images, 3)
    with pytest.raises(TypeError):
        meshes_from_output([Image.new("RGB", (4, 4))], 1)


@pytest.mark.parametrize("size", [256, 96])
def test_preview_png(size: int, renders: dict[str, Render]) -> None:
    mesh = renders["tiny-shap-e"].meshes[0]
    data = preview_png(mesh, size) if size != 256 else preview_png(mesh)
    image = Image.open(io.BytesIO(data))
    assert image.format == "PNG" and image.size == (size, size)
    pixels = np.asarray(image.convert("RGB")).astype(int)
    covered = (np.abs(pixels - 255).sum(axis=-1) > 30).mean()
    assert 0.1 < covered < 0.9, covered  # the sphere fills part of the frame, not none or all of it
    assert pixels.reshape(-1, 3).std(axis=0).max() > 20
