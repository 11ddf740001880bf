"""Safety, watermark and provenance on every output of the real job: policies, checker actions,
`renderfleet verify`, and metadata read back by tools we did not write."""

from __future__ import annotations

import io
import json
import os
import shutil
import struct
import subprocess
from pathlib import Path

import imageio_ffmpeg
import numpy as np
import pytest
import yaml
from PIL import Image

from certs import make_test_chain
from helpers import write_manifest
from jobs.cli import main
from jobs.render import RenderJob, run
from pipelines.media.credentials import read_credentials
from pipelines.media.provenance import read_metadata
from pipelines.tiny.safety import set_checker_mode
from storage.results import absolute_uri, read_results

pytestmark = pytest.mark.timeout(900)


def safety_catalog(tiny_catalog: str, folder: Path, checker_mode: str, **safety) -> str:
    """The tiny catalog with absolute sources, its own checker copy in `checker_mode`, and a safety section."""
    base = Path(tiny_catalog).parent
    data = yaml.safe_load(Path(tiny_catalog).read_text())
    for entry in data["models"].values():
        entry["source"] = str(base / entry["source"])
    checker = folder / f"checker-{checker_mode}"
    if not checker.exists():
        shutil.copytree(base / "tiny-safety-checker", checker)
        set_checker_mode(checker, checker_mode)
    data["models"]["checker"] = {"kind": "safety_checker", "source": str(checker)}
    data["models"]["broken"] = {"kind": "pipeline", "source": str(folder / "no-such-model")}
    (folder / "no-such-model").mkdir(exist_ok=True)
    data["safety"] = {"checker": "checker", **safety}
    path = folder / f"catalog-{checker_mode}-{len(list(folder.glob('catalog-*')))}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return str(path)


def by_id(out: str) -> dict:
    # output_uri is relative to OUT in the results table; these tests open the files.
    return {r["id"]: {**r, "output_uri": absolute_uri(out, r["output_uri"])} for r in read_results(out).to_pylist()}


@pytest.fixture(scope="module")
def signed_run(tmp_path_factory, tiny_catalog, ray_cluster):
    folder = tmp_path_factory.mktemp("safety")
    (folder / "policy.yaml").write_text(yaml.safe_dump({"terms": ["forbidden", "blood bath"], "patterns": [r"kill(ing)? \w+"]}))
    signing = make_test_chain(folder / "keys")
    catalog = safety_catalog(tiny_catalog, folder, "pass_all", prompt_policy=str(folder / "policy.yaml"),
                             c2pa_cert_chain=signing.cert_chain_pem, c2pa_private_key=signing.private_key_pem)
    rows = [
        {"id": "blocked-plain", "prompt": "a forbidden scene"},
        {"id": "blocked-fullwidth", "prompt": "a ｆｏｒｂｉｄｄｅｎ scene"},
        {"id": "blocked-zero-width", "prompt": "a forb\u200bidden scene"},
        {"id": "blocked-dotted", "prompt": "a f.o.r.b.i.d.d.e.n scene"},
        {"id": "blocked-pattern", "prompt": "Killing everyone"},
        {"id": "blocked-before-load", "prompt": "blood  bath", "model": "broken"},
        {"id": "allowed-substring", "prompt": "an unforbiddenly pretty garden"},
        {"id": "png-256", "prompt": "a garden", "width": 256, "height": 256, "num_inference_steps": 2},
        {"id": "jpeg-256", "prompt": "a garden", "width": 256, "height": 256, "num_inference_steps": 2, "output_format": "jpeg"},
        {"id": "png-small", "prompt": "a garden"},
        {"id": "video-256", "task": "video", "model": "tiny-t2v", "prompt": "waves", "width": 256, "height": 256},
        {"id": "mesh", "task": "mesh", "model": "tiny-shap-e", "prompt": "a vase"},
        {"id": "audio", "task": "audio", "model": "tiny-audioldm", "prompt": "a chime"},
    ]
    manifest = write_manifest(str(folder / "m.parquet"), rows)
    out = str(folder / "out")
    report = run(RenderJob(manifest, out, catalog=catalog, workers=1, batch_size=16, address=ray_cluster))
    return report, by_id(out), catalog


def test_blocked_prompts_never_render(signed_run):
    report, results, _ = signed_run
    for rid in ("blocked-plain", "blocked-fullwidth", "blocked-zero-width", "blocked-dotted", "blocked-pattern", "blocked-before-load"):
        r = results[rid]
        assert r["status"] == "filtered" and r["filter_reason"].startswith("prompt_policy: "), r
        assert r["output_uri"] is None and r["render_s"] is None
    assert results["blocked-pattern"]["filter_reason"].startswith("prompt_policy: pattern:")
    assert results["allowed-substring"]["status"] == "ok"
    assert report.counts["filtered"] == 6


def test_outputs_carry_watermark_metadata_and_credentials(signed_run, capsys):
    _, results, _ = signed_run
    ok = {i: r for i, r in results.items() if r["status"] == "ok"}
    assert all(r["nsfw"] is False for i, r in ok.items() if r["task"] in ("image", "video"))
    assert ok["png-256"]["watermark"] == "embedded" and ok["video-256"]["watermark"] == "embedded"
    assert ok["png-small"]["watermark"] == "skipped_small"
    assert ok["mesh"]["watermark"] == ok["audio"]["watermark"] == "not_applicable"
    assert ok["png-256"]["c2pa"] == ok["video-256"]["c2pa"] == "signed"

    assert main(["verify", ok["png-256"]["output_uri"], ok["video-256"]["output_uri"], ok["mesh"]["output_uri"],
                 ok["audio"]["output_uri"]]) == 0
    text = capsys.readouterr().out
    assert text.count("PASS") == 4 and "bit accuracy" in text
    for line in text.splitlines():
        if "bit accuracy" in line:
            assert float(line.split("bit accuracy ")[1].split(",")[0]) >= 0.95, line
    assert main(["verify", ok["png-small"]["output_uri"]]) == 0  # too small to carry a mark: its own status
    assert "[unmarked_small]" in capsys.readouterr().out

    png = Image.open(ok["png-256"]["output_uri"])
    assert png.info["model"] == "tiny-sd" and png.info["row_id"] == "png-256" and "prompt" not in png.info
    assert png.info["prompt_sha256"] and png.info["generator"].startswith("renderfleet ")
    jpeg = Image.open(ok["jpeg-256"]["output_uri"])
    assert "renderfleet" in str(jpeg.getexif().get(0x0131))  # EXIF Software
    ffmpeg = imageio_ffmpeg.get_ffmpeg_exe()
    tags = subprocess.run([ffmpeg, "-hide_banner", "-i", ok["video-256"]["output_uri"], "-f", "ffmetadata", "-"],
                          capture_output=True, text=True).stdout
    assert "row_id=video-256" in tags and "model=tiny-t2v" in tags
    glb = Path(ok["mesh"]["output_uri"]).read_bytes()
    length = struct.unpack("<I", glb[12:16])[0]
    extras = json.loads(glb[20:20 + length])["asset"]["extras"]["renderfleet"]
    assert extras["row_id"] == "mesh" and extras["model"] == "tiny-shap-e"
    wav = Path(ok["audio"]["output_uri"]).read_bytes()
    assert b"LIST" in wav and read_metadata(wav, "wav")["row_id"] == "audio"
    for rid, mime in (("png-256", "image/png"), ("video-256", "video/mp4")):
        manifest = read_credentials(Path(ok[rid]["output_uri"]).read_bytes(), mime)
        assert "trainedAlgorithmicMedia" in json.dumps(manifest)


@pytest.mark.parametrize("action", ["block", "blur", "flag"])
def test_checker_actions(action, tmp_path, tiny_catalog, ray_cluster, signed_run):
    catalog = safety_catalog(tiny_catalog, tmp_path, "flag_all")
    rows = [{"id": "image", "prompt": "a garden", "width": 64, "height": 64},
            {"id": "video", "task": "video", "model": "tiny-t2v", "prompt": "waves"}]
    manifest = write_manifest(str(tmp_path / "m.parquet"), rows)
    out = str(tmp_path / "out")
    run(RenderJob(manifest, out, catalog=catalog, workers=1, address=ray_cluster, safety_action=action))
    results = by_id(out)
    for rid in ("image", "video"):
        r = results[rid]
        assert r["nsfw"] is True and r["safety_action"] == action
        if action == "block":
            assert r["status"] == "filtered" and r["filter_reason"] == "nsfw_output" and r["output_uri"] is None
            assert not list(Path(out).glob(f"{'image' if rid == 'image' else 'video'}/*/*"))
        else:
            assert r["status"] == "ok" and os.path.exists(r["output_uri"])
    if action != "block":
        pixels = np.asarray(Image.open(results["image"]["output_uri"]).convert("L"), dtype=float)
        # A blurred render keeps almost no detail; the tiny model's raw noise has plenty.
        detail = np.abs(np.diff(pixels, axis=1)).mean()
        assert (detail < 3.0) if action == "blur" else (detail > 3.0)
    if action == "block":
        # Final: a rerun does not try filtered rows again.
        again = run(RenderJob(manifest, out, catalog=catalog, workers=1, address=ray_cluster, safety_action=action))
        assert again.skipped == 2
