"""The one output-format table: every task has an encoder and a default format, every encoder writes
what the table says, extension lookups round-trip, and the media package stays free of torch and Ray."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import trimesh
from PIL import Image

from pipelines.media.credentials import SIGNABLE_MIME_TYPES
from pipelines.media.encode import ENCODERS, encode
from pipelines.media.formats import (
    EXTENSIONS,
    FORMATS,
    TASK_FORMATS,
    TASKS,
    OutputFormat,
    format_for_extension,
    format_for_path,
    get_format,
)
from pipelines.media.images import PILLOW_OPTIONS
from pipelines.media.provenance import METADATA_FORMATS, embed_metadata, provenance_record, read_metadata

pytestmark = pytest.mark.timeout(120)

MEDIA = Path(__file__).resolve().parent.parent / "pipelines" / "media"
PIXEL_TASKS = {"image", "edit", "video"}


def _sniff(data: bytes) -> str | None:
    """The MIME type a file's leading bytes announce, independently of the table."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "image/png"
    if data[:3] == b"\xff\xd8\xff":
        return "image/jpeg"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    if data[:4] == b"RIFF" and data[8:12] == b"WAVE":
        return "audio/wav"
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return "image/gif"
    if data[4:8] == b"ftyp" and data[8:12] in (b"isom", b"mp41", b"mp42", b"iso5", b"avc1"):
        return "video/mp4"
    if data[:4] == b"glTF":
        return "model/gltf-binary"
    if data.startswith((b"ply\n", b"ply\r\n")):
        return "application/ply"
    lines = [line.split()[0] for line in data.decode("utf-8", "replace").splitlines() if line.strip()]
    if lines and "v" in lines and set(lines) <= {"#", "v", "vn", "vt", "f", "o", "g", "s", "usemtl", "mtllib"}:
        return "model/obj"
    return None


def _tiny(task: str):
    """The smallest decoded output of each task, in the form render_group hands to encode."""
    rng = np.random.default_rng(0)
    if task in ("image", "edit"):
        return Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8))
    if task == "video":
        return [rng.integers(0, 256, (16, 16, 3), dtype=np.uint8) for _ in range(3)]
    if task == "mesh":
        mesh = trimesh.creation.icosahedron()
        mesh.visual.vertex_colors = rng.integers(0, 256, (len(mesh.vertices), 4), dtype=np.uint8)
        return mesh
    return np.sin(np.linspace(0.0, 40.0, 800)).astype(np.float32), 16000


def test_every_task_has_a_default_format_and_every_format_a_task():
    assert TASKS == ("image", "edit", "video", "mesh", "audio")
    assert tuple(TASK_FORMATS) == TASKS == tuple(ENCODERS)
    for task, names in TASK_FORMATS.items():
        assert names, f"{task} has no default format"
        assert len(set(names)) == len(names)
        assert all(name in FORMATS for name in names)
    for name, fmt in FORMATS.items():
        assert isinstance(fmt, OutputFormat) and fmt.name == name
        assert fmt.tasks == tuple(t for t in TASKS if name in TASK_FORMATS[t]) and fmt.tasks
    assert FORMATS["webp"].tasks == ("image", "edit", "video")
    assert set(PILLOW_OPTIONS) == set(TASK_FORMATS["image"]) == set(TASK_FORMATS["edit"])


def test_finishing_columns_follow_what_each_format_can_hold():
    for fmt in FORMATS.values():
        assert fmt.watermark == bool(PIXEL_TASKS & set(fmt.tasks)), fmt.name  # the mark lives in pixels
    assert {f.name for f in FORMATS.values() if f.signable} == {"png", "jpeg", "webp", "mp4"}
    assert set(SIGNABLE_MIME_TYPES.values()) == {f.mime for f in FORMATS.values() if f.signable}
    for fmt in FORMATS.values():
        for key in (fmt.name, fmt.extension, fmt.mime):
            assert SIGNABLE_MIME_TYPES.get(key) == (fmt.mime if fmt.signable else None)
    assert METADATA_FORMATS == tuple(f.name for f in FORMATS.values() if f.metadata)


@pytest.mark.parametrize(
    "task,name", [(task, name) for name, fmt in FORMATS.items() for task in fmt.tasks if task != "edit"]
)
def test_encoder_writes_the_tables_type_and_takes_metadata(task: str, name: str):
    fmt = FORMATS[name]
    data, ext, mime = encode(task, _tiny(task), name, fps=8.0, extras={"row": "r1"})
    assert (ext, mime) == (fmt.extension, fmt.mime)
    assert _sniff(data) == fmt.mime
    if task == "video" and name == "webp":
        assert b"ANIM" in data[:64]  # animated, not a still
    if fmt.metadata:
        record = provenance_record(version="t", model="m", model_hash="0" * 64, seed=1, steps=None,
                                   guidance=None, job_id="j", row_id="r1", prompt="p")
        assert read_metadata(embed_metadata(data, name, record), fmt.extension) == record


def test_encode_refuses_what_the_table_does_not_allow():
    with pytest.raises(ValueError, match="cannot be written as mp4"):
        encode("image", _tiny("image"), "mp4")
    with pytest.raises(ValueError, match="unknown format"):
        encode("image", _tiny("image"), "bmp")
    with pytest.raises(ValueError, match="unknown task"):
        encode("painting", _tiny("image"), "png")


def test_extension_lookup_round_trips():
    assert len({f.extension for f in FORMATS.values()}) == len(FORMATS)
    for fmt in FORMATS.values():
        assert format_for_extension(fmt.extension) is fmt
        assert format_for_extension("." + fmt.extension.upper()) is fmt
        assert format_for_path(f"s3://bucket/out/a.b/row-1.{fmt.extension}") is fmt
        assert get_format(fmt.name) is fmt and get_format(fmt.extension) is fmt
        assert EXTENSIONS[fmt.extension] is fmt
    assert FORMATS["jpeg"].extension == "jpg" and format_for_extension("jpeg") is FORMATS["jpeg"]
    assert format_for_extension("txt") is None and format_for_path("s3://bucket/no-extension") is None
    with pytest.raises(ValueError, match="unknown format 'bmp'"):
        get_format("bmp")


def test_media_never_imports_torch_or_ray():
    """Not even inside functions: file-only tools (verify, report) must load without the render stack."""
    banned = {"torch", "ray", "diffusers", "transformers"}
    for path in MEDIA.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            for name in names:
                assert name.split(".")[0] not in banned, f"{path.relative_to(MEDIA)} imports {name}"
    code = ("import sys, pkgutil, importlib, pipelines.media, jobs.verify, jobs.report\n"
            "for m in pkgutil.walk_packages(pipelines.media.__path__, 'pipelines.media.'):\n"
            "    importlib.import_module(m.name)\n"
            "print(sorted(m for m in ('torch', 'diffusers', 'transformers', 'ray') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         cwd=MEDIA.parent.parent, check=True)
    assert out.stdout.strip() == "[]"
