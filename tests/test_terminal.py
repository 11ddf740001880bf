"""A quiet, useful terminal: the progress renderer, the job's one rate, and no known-harmless third-party noise."""

from __future__ import annotations

import io
import json
import logging
import os
import re
import subprocess
import sys

import pytest

from cluster.quiet import HARMLESS_LOGS, HarmlessFilter, is_harmless_warning
from helpers import write_manifest
from jobs.progress import Progress, Rate
from jobs.render import JobReport


class FakeStream(io.StringIO):
    def __init__(self, tty: bool):
        super().__init__()
        self.tty = tty

    def isatty(self) -> bool:
        return self.tty


class Clock:
    def __init__(self):
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def test_progress_on_a_terminal_is_one_live_bar_with_rate_eta_and_counts():
    stream, clock = FakeStream(tty=True), Clock()
    p = Progress(20, stream, clock=clock)
    clock.t += 5.0  # start-up: models load before the first output
    p.update(["ok"] * 4)
    clock.t += 2.0
    p.update(["ok", "ok", "failed", "filtered"])
    text = stream.getvalue()
    assert "\n" not in text and text.count("\r\x1b[2K") == 2  # redrawn in place
    last = text.rsplit("\r\x1b[2K", 1)[1]
    assert re.match(r"\[#+-+\] 8/20 +40%", last), last
    assert "ok=6 failed=1 filtered=1" in last
    assert "2.00 rows/s (1.50 images/s)" in last  # 4 rows in the 2 s after the first output
    assert "ETA 0:06" in last  # 12 rows left at 2 rows/s
    clock.t += 6.0
    p.update(["ok"] * 12)
    p.close()
    assert stream.getvalue().endswith("\n") and "20/20 100%" in stream.getvalue()


def test_progress_in_a_log_is_one_plain_line_per_interval():
    stream, clock = FakeStream(tty=False), Clock()
    p = Progress(30, stream, interval_s=10.0, clock=clock)
    clock.t += 1.0
    p.update(["ok"] * 10)
    clock.t += 1.0
    p.update(["ok"] * 10)  # within the interval: no line
    clock.t += 1.0
    p.update(["failed"] * 10)  # the last rows always print
    p.close()
    lines = stream.getvalue().splitlines()
    assert len(lines) == 2 and "\r" not in stream.getvalue() and "\x1b" not in stream.getvalue()
    assert lines[0] == "[renderfleet] 10/30 rows (33%)  ok=10 failed=0 filtered=0  measuring rate"
    assert lines[1].startswith("[renderfleet] 30/30 rows (100%)  ok=20 failed=10 filtered=0  10.00 rows/s")


def test_the_rate_counts_rows_finished_after_the_first_output():
    steady = Rate.measure(done=25, ok=20, elapsed_s=12.0, first_s=7.0, first_rows=5)
    assert steady.steady and steady.rows_per_s == 4.0 and steady.images_per_s == 3.2
    # Nothing measurable after the first output yet: rows over the whole run, flagged.
    short = Rate.measure(done=5, ok=5, elapsed_s=7.0, first_s=7.0, first_rows=5)
    assert not short.steady and short.rows_per_s == pytest.approx(5 / 7)
    assert Rate.measure(0, 0, 0.0, None, 0).rows_per_s == 0.0


def test_summary_and_runs_json_use_the_progress_rate():
    clock = Clock()
    p = Progress(10, FakeStream(tty=False), clock=clock)
    clock.t += 3.0
    p.update(["ok"] * 5)
    clock.t += 2.5
    p.update(["ok"] * 4 + ["failed"])
    report = JobReport(total=10, skipped=0, counts=dict(p.counts), failures={"x": 1}, elapsed_s=6.0, out="o",
                       results="o/results", first_output_s=p.first_s, rate=p.rate(p.elapsed_s))
    assert report.rows_per_s == 2.0 and report.images_per_s == 1.8
    assert any(line.startswith("speed: 2.00 rows/s (1.80 images/s)") for line in report.lines())


def test_nothing_to_do_says_so_instead_of_zero_rates():
    report = JobReport(total=7, skipped=7, counts={}, failures={}, elapsed_s=0.01, out="o", results="o/results")
    lines = report.lines()
    assert "nothing to do: 7 rows already final" in lines
    assert not any("rows/s" in line or "images/s" in line for line in lines)


def test_harmless_filters_are_precise():
    assert is_harmless_warning("Should have ta>=t0 but got ta=0.2 and t0=0.3.", UserWarning,
                               "torchsde._brownian.brownian_interval")
    assert not is_harmless_warning("Should have ta>=t0 but got ta=0.2", UserWarning, "mypackage")
    assert not is_harmless_warning("something else", UserWarning, "torchsde._brownian.brownian_interval")

    def record(name: str, msg: str, level: int = logging.WARNING) -> logging.LogRecord:
        return logging.LogRecord(name, level, __file__, 1, msg, None, None)

    f = HarmlessFilter()
    assert not f.filter(record("diffusers.models.modeling_utils",
                               "There are modules in UNet2DConditionModel that should be kept in float32: []."))
    assert f.filter(record("diffusers.models.modeling_utils", "Something unexpected happened"))
    assert f.filter(record("mylib", "There are modules in X that should be kept in float32"))  # other loggers
    assert not f.filter(record("ray._private.worker", "Started a local Ray instance.", logging.INFO))
    assert f.filter(record("ray._private.worker", "a real Ray warning"))
    assert len(HARMLESS_LOGS) == len(set(HARMLESS_LOGS))


def test_driver_warnings_reach_the_log_file_not_the_terminal(tmp_path):
    code = r"""
import sys, logging, warnings
from cluster.quiet import quiet_driver, log_to_file
quiet_driver()
log_to_file(sys.argv[1])
def torchsde_like():
    warnings.warn_explicit("Should have ta>=t0 but got ta=0.2 and t0=0.3.", UserWarning,
                           "/x/site-packages/torchsde/_brownian/brownian_interval.py", 599)
torchsde_like()
warnings.warn("a warning of our own", UserWarning)
logging.getLogger("diffusers.models.modeling_utils").warning(
    "There are modules in AutoencoderKL that should be kept in float32: [].")
"""
    log = tmp_path / "logs" / "run.log"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run([sys.executable, "-c", code, str(log)], capture_output=True, text=True, timeout=120,
                          env=env, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert done.returncode == 0, done.stderr
    assert "a warning of our own" in done.stderr
    assert "Should have ta" not in done.stderr and "kept in float32" not in done.stderr
    text = log.read_text()
    assert "Should have ta" in text and "kept in float32" in text and "a warning of our own" in text


THIRD_PARTY = re.compile(r"Warning: |should be kept in float32|requires torchvision|has been deprecated|"
                         r"No LoRA keys|weight_norm|torchsde|Should have t[ab]| INFO |Progress bars disabled")


@pytest.mark.timeout(600)
def test_a_small_job_prints_no_third_party_warnings(tmp_path, tiny_catalog, ray_cluster):
    rows = [{"id": f"r{i}", "prompt": "a small scene", "num_inference_steps": 2} for i in range(3)]
    m = write_manifest(str(tmp_path / "m.parquet"), rows)
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    env.pop("RENDERFLEET_VERBOSE", None)
    cmd = [sys.executable, "-m", "jobs.cli", "render", m, "--out", str(out), "--catalog", tiny_catalog,
           "--address", ray_cluster, "--workers", "1"]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=500, env=env, cwd=root)
    assert done.returncode == 0, done.stderr
    noisy = [line for line in done.stderr.splitlines() if THIRD_PARTY.search(line)]
    assert noisy == [], "\n".join(noisy)
    assert "[renderfleet] 3/3 rows (100%)" in done.stderr
    logs = list((out / "logs").glob("*.log"))
    runs = list((out / "runs").glob("*.json"))
    assert len(logs) == 1 and len(runs) == 1 and logs[0].stem == runs[0].stem
    summary = json.loads(runs[0].read_text())
    assert set(summary) >= {"rows_per_s", "images_per_s"} and "steady_rows_per_s" not in summary
    speed = next(line for line in done.stdout.splitlines() if line.startswith("speed: "))
    assert f"{summary['rows_per_s']:.2f} rows/s ({summary['images_per_s']:.2f} images/s)" in speed
    # A rerun has nothing to do, and says so.
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=root)
    assert again.returncode == 0 and "nothing to do: 3 rows already final" in again.stdout
