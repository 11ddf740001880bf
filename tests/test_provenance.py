"""Provenance metadata and C2PA Content Credentials: embedded in each format's own place, read back
by tools we did not write (Pillow, ffmpeg, json, wave, trimesh, c2pa), with pixels / samples /
geometry / video packets unchanged."""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import struct
import subprocess
import wave
import xml.etree.ElementTree as ElementTree
from pathlib import Path

import numpy as np
import pytest
import trimesh
from PIL import Image, ImageSequence

from pipelines import fingerprint
from pipelines.fingerprint import weights_hash
from pipelines.media import provenance
from pipelines.media.audio import encode_wav
from pipelines.media.mesh import encode_mesh
from pipelines.media.provenance import (
    GENERATOR,
    TRAINED_ALGORITHMIC_MEDIA,
    embed_metadata,
    provenance_record,
    read_metadata,
)
from pipelines.media.video import encode_video

pytestmark = pytest.mark.timeout(180)

PROMPT = "a watercolour fox in the snow, ☃ «é»"
RF_NS = provenance.XMP_NAMESPACE
IPTC_NS = "http://iptc.org/std/Iptc4xmpExt/2008-02-29/"


def _record(include_prompt: bool = False, **changes) -> dict[str, str]:
    fields = dict(
        version="0.1.0",
        model="sd15",
        model_hash="ab" * 32,
        seed=1234,
        steps=20,
        guidance=7.5,
        job_id="job-7",
        row_id="row/42",
        prompt=PROMPT,
        include_prompt=include_prompt,
    )
    fields.update(changes)
    return provenance_record(**fields)


@pytest.fixture(scope="module")
def record() -> dict[str, str]:
    return _record()


def _noise(size: int, seed: int = 0, channels: int = 3) -> Image.Image:
    array = np.random.default_rng(seed).integers(0, 256, (size, size, channels), dtype=np.uint8)
    return Image.fromarray(array)


def _save(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def _frames_rgba(data: bytes) -> list[bytes]:
    """Every frame, decoded by Pillow, as RGBA bytes."""
    with Image.open(io.BytesIO(data)) as image:
        return [frame.convert("RGBA").tobytes() for frame in ImageSequence.Iterator(image)]


def _xmp_values(packet: bytes | str) -> dict[str, str]:
    """{Clark-notation tag: text} of every leaf element of an XMP packet, parsed by ElementTree."""
    text = packet.decode("utf-8") if isinstance(packet, bytes) else packet
    text = text[text.index("<x:xmpmeta") : text.rindex("</x:xmpmeta>") + len("</x:xmpmeta>")]
    return {node.tag: node.text or "" for node in ElementTree.fromstring(text).iter() if len(node) == 0}


def _check_xmp(packet: bytes | str, record: dict[str, str]) -> None:
    values = _xmp_values(packet)
    assert values[f"{{{IPTC_NS}}}DigitalSourceType"] == TRAINED_ALGORITHMIC_MEDIA
    assert values["{http://ns.adobe.com/xap/1.0/}CreatorTool"] == record["generator"]
    assert json.loads(values[f"{{{RF_NS}}}record"]) == record
    for key, value in record.items():
        assert values[f"{{{RF_NS}}}{key}"] == value


def _check_exif(image: Image.Image, record: dict[str, str]) -> None:
    exif = image.getexif()
    assert exif[0x0131] == record["generator"]  # Software
    assert record["model"] in exif[0x010E]  # ImageDescription
    comment = exif.get_ifd(0x8769)[0x9286]  # UserComment
    assert comment[:8] == b"ASCII\x00\x00\x00"
    assert json.loads(comment[8:]) == record


# ---------------------------------------------------------------------------
# The record
# ---------------------------------------------------------------------------


def test_record_hashes_the_prompt_by_default(record):
    assert record == {
        "generator": f"{GENERATOR} 0.1.0",
        "model": "sd15",
        "model_sha256": "ab" * 32,
        "seed": "1234",
        "steps": "20",
        "guidance": "7.5",
        "job_id": "job-7",
        "row_id": "row/42",
        "prompt_sha256": hashlib.sha256(PROMPT.encode("utf-8")).hexdigest(),
    }
    assert "prompt" not in record
    assert all(isinstance(v, str) for v in record.values())


def test_record_includes_the_prompt_only_on_request():
    record = _record(include_prompt=True, steps=None, guidance=None)
    assert record["prompt"] == PROMPT
    assert "prompt_sha256" not in record
    assert "steps" not in record and "guidance" not in record


def test_bad_records_and_formats_are_refused(record):
    png = _save(_noise(8), "PNG")
    with pytest.raises(ValueError, match="unknown format"):
        embed_metadata(png, "tiff", record)
    with pytest.raises(ValueError, match="portable tag name"):
        embed_metadata(png, "png", {"bad key": "x"})
    with pytest.raises(TypeError):
        embed_metadata(png, "png", {"seed": 1})  # type: ignore[dict-item]
    with pytest.raises(ValueError, match="not a PNG"):
        embed_metadata(b"GIF89a....", "png", record)


# ---------------------------------------------------------------------------
# Images
# ---------------------------------------------------------------------------


def _png_chunks(data: bytes) -> list[tuple[bytes, bytes]]:
    pos, chunks = 8, []
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        chunks.append((data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + length]))
        pos += 12 + length
    return chunks


@pytest.mark.parametrize("size,mode", [(64, "RGB"), (256, "RGB"), (64, "RGBA")])
def test_png_text_chunks(record, size, mode):
    original = _save(_noise(size, channels=len(mode)), "PNG")
    out = embed_metadata(original, "png", record)
    with Image.open(io.BytesIO(out)) as image:
        image.load()
        assert image.mode == mode
        for key, value in record.items():
            assert image.text[key] == value
        assert json.loads(image.text["renderfleet"]) == record
        _check_xmp(image.info["xmp"], record)
    assert _frames_rgba(out) == _frames_rgba(original)
    # Not re-encoded at all: the image data chunks are the very same bytes.
    idat = [payload for ctype, payload in _png_chunks(original) if ctype == b"IDAT"]
    assert [payload for ctype, payload in _png_chunks(out) if ctype == b"IDAT"] == idat
    assert read_metadata(out, "png") == record
    assert read_metadata(original, "png") == {}


def test_png_unicode_prompt_and_re_embedding_replaces(record):
    original = _save(_noise(64), "PNG", pnginfo=_pnginfo(Software="another tool"))
    with_prompt = _record(include_prompt=True)
    first = embed_metadata(original, "png", with_prompt)
    with Image.open(io.BytesIO(first)) as image:
        assert image.text["prompt"] == PROMPT  # iTXt: not Latin-1
        assert image.text["Software"] == "another tool"  # others' chunks kept
    second = embed_metadata(first, "png", record)
    assert embed_metadata(second, "png", record) == second  # idempotent
    with Image.open(io.BytesIO(second)) as image:
        assert "prompt" not in image.text  # the earlier record's keys are gone
        assert image.text["prompt_sha256"] == record["prompt_sha256"]
        assert image.text["Software"] == "another tool"
    assert read_metadata(second, "png") == record
    assert _frames_rgba(second) == _frames_rgba(original)


def _pnginfo(**texts):
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    for key, value in texts.items():
        info.add_text(key, value)
    return info


@pytest.mark.parametrize(
    "options",
    [{"lossless": True}, {"quality": 90}, {"lossless": True, "alpha": True}],
    ids=["lossless", "lossy", "lossless-alpha"],
)
def test_webp_xmp_and_exif_without_re_encoding(record, options):
    options = dict(options)
    channels = 4 if options.pop("alpha", False) else 3
    original = _save(_noise(64, channels=channels), "WEBP", **options)
    out = embed_metadata(original, "webp", record)
    assert out[:4] == b"RIFF" and out[8:12] == b"WEBP"
    assert struct.unpack("<I", out[4:8])[0] == len(out) - 8
    assert out[12:16] == b"VP8X"
    with Image.open(io.BytesIO(out)) as image:
        assert image.format == "WEBP"
        _check_xmp(image.info["xmp"], record)
        _check_exif(image, record)
    assert _frames_rgba(out) == _frames_rgba(original)  # same bitstream, same pixels (lossy too)
    assert read_metadata(out, "webp") == record
    assert embed_metadata(out, "webp", record) == out


def test_animated_webp_and_gif_keep_every_frame(record):
    frames = [np.asarray(_noise(32, seed=i)) for i in range(4)]
    for fmt in ("webp", "gif"):
        original, _, _ = encode_video(frames, 8, fmt)
        out = embed_metadata(original, fmt, record)
        assert _frames_rgba(out) == _frames_rgba(original)
        assert len(_frames_rgba(out)) == 4
        with Image.open(io.BytesIO(out)) as image:
            assert image.info.get("loop") == 0
            if fmt == "webp":
                _check_xmp(image.info["xmp"], record)
        assert read_metadata(out, fmt) == record


def test_jpeg_exif_and_xmp_segments(record):
    original = _save(_noise(64), "JPEG", quality=95)
    out = embed_metadata(original, "jpeg", record)
    with Image.open(io.BytesIO(out)) as image:
        assert image.format == "JPEG"
        assert "jfif" in image.info  # JFIF APP0 kept first
        _check_exif(image, record)
        _check_xmp(image.info["xmp"], record)
    assert _frames_rgba(out) == _frames_rgba(original)
    # The entropy-coded scan is untouched: everything from SOS on is the same bytes.
    assert out[out.index(b"\xff\xda") :] == original[original.index(b"\xff\xda") :]
    assert out[2:4] == b"\xff\xe0"
    assert read_metadata(out, "jpeg") == record
    assert embed_metadata(out, "jpeg", record) == out


def test_jpeg_keeps_foreign_xmp(record):
    foreign = (
        '<?xpacket begin="" id="W5M0MpCehiHzreSzNTczkc9d"?><x:xmpmeta xmlns:x="adobe:ns:meta/">'
        '<rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#"><rdf:Description rdf:about="" '
        'xmlns:dc="http://purl.org/dc/elements/1.1/"><dc:format>image/jpeg</dc:format></rdf:Description>'
        '</rdf:RDF></x:xmpmeta><?xpacket end="w"?>'
    )
    original = _save(_noise(64), "JPEG", xmp=foreign.encode())
    out = embed_metadata(original, "jpeg", record)
    with Image.open(io.BytesIO(out)) as image:
        values = _xmp_values(image.info["xmp"])
    assert values["{http://purl.org/dc/elements/1.1/}format"] == "image/jpeg"
    assert json.loads(values[f"{{{RF_NS}}}record"]) == record
    assert embed_metadata(out, "jpeg", record) == out


def test_gif_comment_extension(record):
    original = _save(_noise(64).convert("P"), "GIF")
    out = embed_metadata(original, "gif", record)
    with Image.open(io.BytesIO(out)) as image:
        comment = image.info["comment"]
    prefix = b"renderfleet-provenance "
    assert comment.startswith(prefix)
    assert json.loads(comment[len(prefix) :]) == record
    assert _frames_rgba(out) == _frames_rgba(original)
    assert read_metadata(out, "gif") == record
    assert embed_metadata(out, "gif", record) == out


# ---------------------------------------------------------------------------
# Video
# ---------------------------------------------------------------------------


def _ffmpeg(*args: str) -> subprocess.CompletedProcess:
    import imageio_ffmpeg

    return subprocess.run(
        [imageio_ffmpeg.get_ffmpeg_exe(), "-hide_banner", "-nostdin", *args],
        capture_output=True,
        text=True,
        timeout=120,
    )


def _packet_digests(path: Path) -> tuple[str, str]:
    """(md5 of the video packets, per-packet framemd5 with timestamps) by a stream-copying ffmpeg."""
    digests = []
    for muxer in ("md5", "framemd5"):
        proc = _ffmpeg("-v", "error", "-i", str(path), "-map", "0:v", "-c", "copy", "-f", muxer, "-")
        assert proc.returncode == 0, proc.stderr
        digests.append("\n".join(line for line in proc.stdout.splitlines() if not line.startswith("#")))
    return digests[0], digests[1]


def _ffmetadata(path: Path) -> dict[str, str]:
    """Global tags as ffmpeg's ffmetadata muxer writes them (full values, \\-escaped)."""
    proc = _ffmpeg("-v", "error", "-i", str(path), "-f", "ffmetadata", "-")
    assert proc.returncode == 0, proc.stderr
    tags, key, value, escaped, in_value = {}, "", "", False, False
    for char in proc.stdout.split("\n", 1)[1]:  # after the ";FFMETADATA1" line
        if escaped:
            value, key = (value + char, key) if in_value else (value, key + char)
            escaped = False
        elif char == "\\":
            escaped = True
        elif char == "=" and not in_value:
            in_value = True
        elif char == "\n":
            if in_value:
                tags[key] = value
            key, value, in_value = "", "", False
        elif in_value:
            value += char
        else:
            key += char
    return tags


@pytest.fixture(scope="module")
def mp4_bytes() -> bytes:
    rng = np.random.default_rng(3)
    frames = [rng.integers(0, 256, (64, 64, 3), dtype=np.uint8) for _ in range(8)]
    data, _, _ = encode_video(frames, 8, "mp4")
    return data


def test_mp4_metadata_tags_without_re_encoding(tmp_path, mp4_bytes, record):
    record = _record(include_prompt=True)
    out = embed_metadata(mp4_bytes, "mp4", record)
    before, after = tmp_path / "in.mp4", tmp_path / "out.mp4"
    before.write_bytes(mp4_bytes)
    after.write_bytes(out)
    assert _packet_digests(after) == _packet_digests(before)

    probe = _ffmpeg("-i", str(after)).stderr  # "no output file" exit; the header dump is what we want
    tags = {}
    for line in probe.split("Duration:")[0].splitlines():
        match = re.match(r"^\s{4}(\w+)\s*: (.*)$", line)
        if match:
            tags[match.group(1)] = match.group(2)
    for key, value in record.items():
        assert tags[key] == value, key
    assert tags["comment"].startswith('{"generator":')  # ffmpeg's dump cuts long values at 255 characters
    full = _ffmetadata(after)
    assert json.loads(full["comment"]) == record
    assert full["prompt"] == PROMPT
    assert "major_brand" in tags and ";" not in tags["major_brand"]  # brands not duplicated into tags

    assert read_metadata(out, "mp4") == record
    assert read_metadata(mp4_bytes, "mp4") == {}
    # Re-embedding replaces: the prompt key of the earlier record goes away.
    plain = _record()
    again = embed_metadata(out, "mp4", plain)
    assert read_metadata(again, "mp4") == plain
    after.write_bytes(again)
    assert "prompt " not in _ffmpeg("-i", str(after)).stderr
    assert _packet_digests(after) == _packet_digests(before)


# ---------------------------------------------------------------------------
# Meshes
# ---------------------------------------------------------------------------


def _glb_chunks(data: bytes) -> list[tuple[bytes, bytes]]:
    assert data[:4] == b"glTF"
    version, length = struct.unpack("<II", data[4:12])
    assert version == 2 and length == len(data)
    pos, chunks = 12, []
    while pos < len(data):
        chunk_length, chunk_type = struct.unpack("<I4s", data[pos : pos + 8])
        chunks.append((chunk_type, data[pos + 8 : pos + 8 + chunk_length]))
        pos += 8 + chunk_length
    return chunks


@pytest.fixture(scope="module")
def sphere() -> trimesh.Trimesh:
    return trimesh.creation.icosphere()


def _load(data: bytes, fmt: str) -> trimesh.Trimesh:
    return trimesh.load(io.BytesIO(data), file_type=fmt, force="mesh", process=False)


@pytest.mark.parametrize("existing_extras", [None, {"prompt_id": "p-1", "seed": 7}])
def test_glb_asset_extras(sphere, record, existing_extras):
    if existing_extras is None:
        original = sphere.export(file_type="glb")
    else:
        original, _, _ = encode_mesh(sphere, "glb", extras=existing_extras)
    out = embed_metadata(original, "glb", record)
    chunks = _glb_chunks(out)
    assert chunks[0][0] == b"JSON" and len(chunks[0][1]) % 4 == 0
    tree = json.loads(chunks[0][1])
    extras = tree["asset"]["extras"]
    assert extras["renderfleet"] == record
    for key, value in (existing_extras or {}).items():
        assert extras[key] == value  # merged, not replaced
    assert tree["asset"]["version"] == "2.0"
    assert chunks[1:] == _glb_chunks(original)[1:]  # BIN chunk byte-identical
    np.testing.assert_array_equal(_load(out, "glb").vertices, _load(original, "glb").vertices)
    np.testing.assert_array_equal(_load(out, "glb").faces, _load(original, "glb").faces)
    assert read_metadata(out, "glb") == record
    assert embed_metadata(out, "glb", record) == out


@pytest.mark.parametrize("fmt", ["ply", "obj"])
def test_ply_and_obj_comment_line(sphere, record, fmt):
    original = sphere.export(file_type=fmt)
    original = original.encode() if isinstance(original, str) else original
    out = embed_metadata(original, fmt, record)
    prefix = b"comment renderfleet-provenance " if fmt == "ply" else b"# renderfleet-provenance "
    lines = [line for line in out.split(b"\n") if line.startswith(prefix)]
    assert len(lines) == 1 and json.loads(lines[0][len(prefix) :]) == record
    if fmt == "ply":
        header_end = original.index(b"end_header\n") + len(b"end_header\n")
        assert out.endswith(original[header_end:])  # binary body untouched
    loaded, reference = _load(out, fmt), _load(original, fmt)
    np.testing.assert_array_equal(loaded.vertices, reference.vertices)
    np.testing.assert_array_equal(loaded.faces, reference.faces)
    assert read_metadata(out, fmt) == record
    assert embed_metadata(out, fmt, record) == out


# ---------------------------------------------------------------------------
# Audio
# ---------------------------------------------------------------------------


def test_wav_list_info_chunk(record):
    t = np.arange(8000) / 16000.0
    original, _, _ = encode_wav(np.sin(2 * np.pi * 440.0 * t), 16000)
    out = embed_metadata(original, "wav", record)
    with wave.open(io.BytesIO(original)) as a, wave.open(io.BytesIO(out)) as b:
        assert b.getparams() == a.getparams()
        assert b.getnframes() == 8000
        assert b.readframes(b.getnframes()) == a.readframes(a.getnframes())
    assert struct.unpack("<I", out[4:8])[0] == len(out) - 8
    info = out[out.index(b"LIST") :]
    assert info[8:12] == b"INFO"
    for tag, value in (
        (b"INAM", record["row_id"]),
        (b"ISFT", record["generator"]),
        (b"ICMT", json.dumps(record, separators=(",", ":"))),
    ):
        at = info.index(tag)
        (size,) = struct.unpack("<I", info[at + 4 : at + 8])
        assert info[at + 8 : at + 8 + size].rstrip(b"\x00").decode() == value
    assert read_metadata(out, "wav") == record
    assert read_metadata(original, "wav") == {}
    assert embed_metadata(out, "wav", record) == out


# ---------------------------------------------------------------------------
# Model weights fingerprint
# ---------------------------------------------------------------------------


def _model_dir(root: Path) -> Path:
    (root / "unet").mkdir(parents=True)
    (root / "text_encoder").mkdir()
    (root / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline"}')
    (root / "unet" / "config.json").write_text('{"sample_size": 8}')
    rng = np.random.default_rng(11)
    (root / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(rng.bytes(4096))
    (root / "text_encoder" / "model.safetensors").write_bytes(rng.bytes(2048))
    (root / "README.md").write_text("not hashed")
    old = 1_600_000_000  # long-settled files, as downloaded models are
    for path in root.rglob("*"):
        if path.is_file():
            os.utime(path, (old, old))
    return root


def _count_file_hashes(monkeypatch) -> list[str]:
    calls: list[str] = []
    real = fingerprint._file_sha256

    def counting(path):
        calls.append(Path(path).name)
        return real(path)

    monkeypatch.setattr(fingerprint, "_file_sha256", counting)
    return calls


def test_weights_hash_is_stable_and_cached(tmp_path, monkeypatch):
    model = _model_dir(tmp_path / "model")
    calls = _count_file_hashes(monkeypatch)
    first = weights_hash(model)
    assert re.fullmatch(r"[0-9a-f]{64}", first)
    assert len(calls) == 4  # 2 safetensors + model_index.json + config.json, not README.md
    assert (model / fingerprint.WEIGHTS_CACHE_NAME).is_file()

    calls.clear()
    assert weights_hash(str(model)) == first
    assert calls == []  # second call: every digest from the sidecar

    # Relative paths only: a copy elsewhere has the same fingerprint.
    import shutil

    copy = tmp_path / "elsewhere" / "model-copy"
    shutil.copytree(model, copy, ignore=shutil.ignore_patterns(".*"))
    assert weights_hash(copy) == first

    # A changed weights file changes the fingerprint, and only that file is read again.
    calls.clear()
    weights = model / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(os.urandom(4096))
    os.utime(weights, (1_600_000_100, 1_600_000_100))
    changed = weights_hash(model)
    assert changed != first
    assert calls == ["diffusion_pytorch_model.safetensors"]
    # So does a changed config.
    config = model / "unet" / "config.json"
    config.write_text('{"sample_size": 16}')
    os.utime(config, (1_600_000_200, 1_600_000_200))
    assert weights_hash(model) not in (first, changed)
    # Files outside the set do not matter.
    before = weights_hash(model)
    (model / "README.md").write_text("changed")
    assert weights_hash(model) == before


def test_weights_hash_ignores_a_stale_looking_cache_for_fresh_files(tmp_path, monkeypatch):
    model = tmp_path / "fresh"
    model.mkdir()
    (model / "model.safetensors").write_bytes(b"x" * 100)
    calls = _count_file_hashes(monkeypatch)
    first = weights_hash(model)
    # Same size and same mtime, different bytes: a write within the mtime granularity window.
    stat = (model / "model.safetensors").stat()
    (model / "model.safetensors").write_bytes(b"y" * 100)
    os.utime(model / "model.safetensors", ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert weights_hash(model) != first  # the just-written file was not trusted from the cache
    assert len(calls) == 2


def test_weights_hash_read_only_directory(tmp_path, monkeypatch):
    model = _model_dir(tmp_path / "model")
    reference = weights_hash(_model_dir(tmp_path / "reference"))

    def read_only(*args, **kwargs):
        raise PermissionError(13, "Read-only file system")

    monkeypatch.setattr(fingerprint.tempfile, "mkstemp", read_only)
    assert weights_hash(model) == reference
    assert weights_hash(model) == reference
    assert not (model / fingerprint.WEIGHTS_CACHE_NAME).exists()


def test_weights_hash_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        weights_hash(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="safetensors"):
        weights_hash(tmp_path / "empty")


# ---------------------------------------------------------------------------
# C2PA Content Credentials
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def signing(tmp_path_factory):
    from certs import make_test_chain

    return make_test_chain(tmp_path_factory.mktemp("c2pa-chain"))


def _reader_manifest(data: bytes, mime: str) -> tuple[dict, dict]:
    """(active manifest, whole store) as c2pa's own Reader reports them."""
    import c2pa

    reader = c2pa.Reader(mime, io.BytesIO(data))
    try:
        store = json.loads(reader.json())
    finally:
        reader.close()
    return store["manifests"][store["active_manifest"]], store


def _check_manifest(manifest: dict, store: dict, record: dict[str, str]) -> None:
    assert manifest["claim_generator_info"][0]["name"] == "renderfleet"
    assertions = {a["label"]: a["data"] for a in manifest["assertions"]}
    actions_label = next(label for label in assertions if label.startswith("c2pa.actions"))
    created = [a for a in assertions[actions_label]["actions"] if a["action"] == "c2pa.created"]
    assert len(created) == 1
    assert created[0]["digitalSourceType"] == TRAINED_ALGORITHMIC_MEDIA
    assert assertions["com.renderfleet.provenance"] == record
    # The only complaint about a throwaway chain is that nobody trusts it; every hash matches.
    codes = {status["code"] for status in store.get("validation_status", [])}
    assert codes <= {"signingCredential.untrusted"}, codes
    failures = store["validation_results"]["activeManifest"]["failure"]
    assert {f["code"] for f in failures} <= {"signingCredential.untrusted"}


def test_c2pa_png(signing, record):
    from pipelines.media.credentials import read_credentials, sign_asset

    original = _save(_noise(256), "PNG")
    assert read_credentials(original, "image/png") is None
    embedded = embed_metadata(original, "png", record)  # metadata first: the signature binds the bytes
    signed = sign_asset(embedded, "image/png", signing, record)
    manifest, store = _reader_manifest(signed, "image/png")
    _check_manifest(manifest, store, record)
    assert "thumbnail" not in manifest
    assert len(signed) - len(embedded) < 64 * 1024  # no 1024-pixel thumbnail
    assert _frames_rgba(signed) == _frames_rgba(original)
    assert read_metadata(signed, "png") == record  # the unsigned metadata is still there

    ours = read_credentials(signed, "png")
    assert ours["assertions"] == manifest["assertions"]
    assert ours["validation_state"] == "Valid"

    tampered = bytearray(signed)
    tampered[signed.index(b"IDAT") + 64] ^= 0xFF
    broken = read_credentials(bytes(tampered), "image/png")
    assert any(s["code"] == "assertion.dataHash.mismatch" for s in broken["validation_status"])


def test_c2pa_mp4(tmp_path, signing, mp4_bytes, record):
    from pipelines.media.credentials import read_credentials, sign_asset

    assert read_credentials(mp4_bytes, "video/mp4") is None
    embedded = embed_metadata(mp4_bytes, "mp4", record)
    signed = sign_asset(embedded, "video/mp4", signing, record)
    manifest, store = _reader_manifest(signed, "video/mp4")
    _check_manifest(manifest, store, record)
    assert any(a["label"].startswith("c2pa.hash.bmff") for a in manifest["assertions"])
    assert read_metadata(signed, "mp4") == record
    before, after = tmp_path / "in.mp4", tmp_path / "signed.mp4"
    before.write_bytes(mp4_bytes)
    after.write_bytes(signed)
    assert _packet_digests(after) == _packet_digests(before)
    assert read_credentials(signed, "mp4")["validation_state"] == "Valid"


@pytest.mark.parametrize("fmt", ["jpeg", "webp"])
def test_c2pa_other_images(signing, record, fmt):
    from pipelines.media.credentials import read_credentials, sign_asset

    original = _save(_noise(64), fmt.upper(), quality=95)
    signed = sign_asset(embed_metadata(original, fmt, record), f"image/{fmt}", signing, record)
    manifest, store = _reader_manifest(signed, f"image/{fmt}")
    _check_manifest(manifest, store, record)
    assert read_metadata(signed, fmt) == record
    assert _frames_rgba(signed) == _frames_rgba(original)
    assert read_credentials(signed, fmt)["validation_state"] == "Valid"


def test_c2pa_refuses_unsupported_types(signing, record):
    from pipelines.media.credentials import sign_asset

    with pytest.raises(ValueError, match="cannot sign"):
        sign_asset(b"glTF", "model/gltf-binary", signing, record)


def test_test_chain_profile(signing):
    from cryptography import x509
    from cryptography.x509.oid import ExtendedKeyUsageOID

    pem = Path(signing.cert_chain_pem).read_bytes()
    leaf, ca = x509.load_pem_x509_certificates(pem)
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert ca.extensions.get_extension_for_class(x509.KeyUsage).value.key_cert_sign
    assert not leaf.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert leaf.extensions.get_extension_for_class(x509.KeyUsage).value.digital_signature
    eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert ExtendedKeyUsageOID.EMAIL_PROTECTION in eku
    aki = leaf.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value.key_identifier
    assert aki == ca.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest
    assert leaf.issuer == ca.subject
    assert signing.alg == "es256"
