"""`renderfleet bench --smoke`: the harness runs sections and leaves JSON, Markdown and PNGs behind.

CI runs two sections, (g) finishing and (h) start-up (a real CLI job): the smoke of all eight takes many
minutes on 2 cores, since each section starts its own Ray; `RENDERFLEET_BENCH_SECTIONS=abcdefgh` runs them all.

Figures are never compared with anything: timings depend on the machine. Only their presence and type are checked.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SECTIONS = list(os.environ.get("RENDERFLEET_BENCH_SECTIONS", "gh"))

pytestmark = pytest.mark.timeout(1800)


def test_bench_smoke_writes_every_section(tmp_path):
    out = tmp_path / "bench"
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_DATA_EXECUTION_NO_PROGRESS_TIMEOUT_S": "120",
           "RAY_AUTH_MODE": "disabled"}
    cmd = [sys.executable, "-m", "jobs.cli", "bench", "--smoke", "--out", str(out), "--section-timeout", "600",
           "--only", ",".join(SECTIONS)]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=1700)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    print(output)
    data = json.loads((out / "bench.json").read_text())
    assert list(data["sections"]) == SECTIONS
    for name, section in data["sections"].items():
        assert not section.get("error"), f"({name}) {section.get('error')}\n{(out / 'logs' / f'{name}.log').read_text()[-3000:]}"
        assert section["figures"], name
        assert all(isinstance(v, float) and math.isfinite(v) for v in section["figures"].values()), (name, section["figures"])
        for t in section["targets"]:
            assert t["figure"] in section["figures"] and isinstance(t["pass"], bool), (name, t)
        if section.get("plot"):
            assert (out / f"bench-{name}.png").stat().st_size > 0, name
    table = (out / "bench.md").read_text()
    assert "| section | figure | value | target | result |" in table
    assert all(f"| {name} |" in table for name in SECTIONS)
    assert data["machine"]["cpus"] and data["smoke"] is True
    assert proc.returncode == 0, output


def test_bench_only_rejects_unknown_sections():
    proc = subprocess.run([sys.executable, "-m", "jobs.cli", "bench", "--only", "a,z"], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2 and "unknown section" in proc.stderr
