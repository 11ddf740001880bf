"""`bench/gpu.py`, the accelerator check: the committed configs are the published architectures, and the whole
code path (every section, bare diffusers and the Renderer, offload policies, compile) runs on CPU under --smoke."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench.gpu_models import ARCHS, COMPONENTS, build, load_configs, parameters

pytestmark = pytest.mark.timeout(600)
ROOT = Path(__file__).resolve().parent.parent

# Published parameter counts (millions, 2 decimals) of the checkpoints the configs come from.
PUBLISHED = {
    "sd15": {"unet": 859.52, "vae": 83.65, "text_encoder": 123.06},
    "sdxl": {"unet": 2567.46, "vae": 83.65, "text_encoder": 123.06, "text_encoder_2": 694.66},
}


@pytest.mark.parametrize("arch", ARCHS)
def test_configs_are_the_published_architectures(arch):
    assert set(load_configs(arch)) == set(COMPONENTS[arch])
    pipe = build(arch, torch.device("meta"), torch.float16)  # shapes only: no memory, no time
    assert {k: round(v / 1e6, 2) for k, v in parameters(pipe).items()} == PUBLISHED[arch]
    assert pipe.unet.dtype == torch.float16


def _bench(args: list[str], timeout: int) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "bench.gpu", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_smoke_runs_every_section(tmp_path):
    done = _bench(["--smoke", "--out", str(tmp_path)], timeout=540)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = {s: json.loads((tmp_path / f"gpu-{s}.json").read_text()) for s in ("throughput", "offload", "compile")}
    assert not [r for s in rows.values() for r in s if "failed" in r.get("note", "") or "unavailable" in r.get("note", "")]
    timed = [r for r in rows["throughput"] if r["variant"] in ("diffusers", "renderer")]
    assert {(r["arch"], r["variant"], r["batch"]) for r in timed} == {
        (a, v, b) for a in ARCHS for v in ("diffusers", "renderer") for b in (1, 2)}
    assert all(isinstance(r["step_ms"], float) and r["images_per_s"] > 0 for r in timed)
    assert [r["variant"] for r in rows["offload"]] == ["none", "model", "group", "group-leaf", "sequential"]
    assert {r["variant"] for r in rows["compile"]} == {"regional/eager", "full/eager"}
    assert all(r["compile_s"] > 0 for r in rows["compile"] if r["batch"] == 1)  # the first shape compiles
    assert list((tmp_path / "work" / "renders").rglob("*.png"))  # the Renderer wrote its outputs
    table = (tmp_path / "gpu-table.txt").read_text()
    assert table.startswith("section") and "regional/eager" in table
    assert len((tmp_path / "gpu.jsonl").read_text().splitlines()) == sum(len(s) for s in rows.values())


def test_the_guard_stops_and_keeps_what_finished(tmp_path):
    done = _bench(["--smoke", "--out", str(tmp_path), "--guard-seconds", "1", "--sections", "throughput"], timeout=300)
    assert done.returncode == 3
    assert "guard expired" in (tmp_path / "gpu-table.txt").read_text()
    assert (tmp_path / "gpu-throughput.json").exists()
