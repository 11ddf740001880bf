"""Faults injected into batch jobs at seeded counts of `ok` rows, each case ending with the same check
(batch_faults_kit.check_outcome): every id once with a final status, every output matching its sha256.

One Ray cluster and one S3 server for the whole module; `pytest -s` prints each case's figures
(rows, lost, duplicated, retried, time) and at the end a table against undisturbed runs of the same
manifest, timed last so that they run on a warm cluster as the cases did.
"""

from __future__ import annotations

import os
import random
import shlex
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import ray

from batch_faults_kit import (JOB_ARGS, ROWS, SEED, Driver, Figures, JobThread, OutputWatch, check_outcome,
                              cli_command, fault_manifest, local_outputs, render_actor_pids, results_folder_blocked,
                              s3_outputs)
from jobs.render import RenderJob, run
from s3server import SlowDownProxy
from storage.results import JobStopped, read_results

pytestmark = pytest.mark.timeout(600)


@dataclass
class Suite:
    """What the cases share: one manifest, the figures, and where to time undisturbed runs of it."""

    folder: Path
    manifest: str
    ids: list[str]
    catalog: str
    address: str
    s3_bucket: str
    figures: list[Figures] = field(default_factory=list)

    def job(self, out: str, **overrides) -> RenderJob:
        return RenderJob(self.manifest, out, catalog=self.catalog, address=self.address, **{**JOB_ARGS, **overrides})

    def undisturbed(self, store: str) -> float:
        """Seconds for a run of the same manifest with no fault, to a fresh OUT on `store`."""
        out = str(self.folder / "undisturbed") if store == "local" else f"{self.s3_bucket}/undisturbed"
        started = time.monotonic()
        report = run(self.job(out))
        assert report.counts == {"ok": ROWS}
        return time.monotonic() - started

    def record(self, figures: Figures) -> Figures:
        self.figures.append(figures)
        return figures

    def summary(self) -> None:
        """Times the undisturbed runs last, on a warm cluster like the cases had, and prints every case."""
        baselines = {store: self.undisturbed(store) for store in sorted({f.store for f in self.figures})}
        print("\n[faults] summary (undisturbed: " + ", ".join(f"{k} {v:.1f}s" for k, v in baselines.items()) + ")")
        for f in self.figures:
            print(f"[faults]   {f.line(baselines[f.store])}", flush=True)


@pytest.fixture(scope="module")
def suite(tmp_path_factory, tiny_catalog, ray_cluster, s3_server) -> Iterator[Suite]:
    folder = tmp_path_factory.mktemp("batch-faults")
    manifest, ids = fault_manifest(str(folder / "manifest.parquet"))
    s = Suite(folder, manifest, ids, tiny_catalog, ray_cluster, s3_server.create_bucket("faults-undisturbed"))
    yield s
    if s.figures:
        s.summary()


def seeded(case: int) -> random.Random:
    return random.Random(SEED * 100 + case)


def test_render_actors_killed_five_times(suite):
    out = str(suite.folder / "actor-kills")
    rng = seeded(1)
    points = [rng.randint(low, low + 5) for low in (4, 12, 20, 28, 36)]
    job_id = ray.get_runtime_context().get_job_id()
    killed: list[int] = []
    started = time.monotonic()
    with OutputWatch(local_outputs(out)) as watch:
        job = JobThread(lambda: run(suite.job(out)))
        job.start()
        for point in points:
            watch.wait_for(point, job.is_alive)
            pids = wait_for_actors(job_id, job.is_alive)
            pid = rng.choice(pids)
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)
        report = job.outcome()
    seconds = time.monotonic() - started
    assert len(set(killed)) == 5
    assert report.counts == {"ok": ROWS}
    suite.record(check_outcome("1 render actors killed x5", out, suite.ids, watch.writes, seconds,
                               f"killed at {points} ok rows"))


def wait_for_actors(job_id: str, alive, timeout_s: float = 180) -> list[int]:
    """This job's live render actor pids, once there is at least one (a killed one may be restarting)."""
    found: list[int] = []

    def any_alive() -> bool:
        found[:] = render_actor_pids(job_id)
        return bool(found)

    wait_until(any_alive, alive, timeout_s)
    return found


def test_driver_killed_three_times_then_rerun(suite):
    out = str(suite.folder / "driver-kills")
    rng = seeded(2)
    points = [rng.randint(6, 12), rng.randint(18, 24), rng.randint(30, 36)]
    started = time.monotonic()
    with OutputWatch(local_outputs(out)) as watch, \
            Driver(cli_command(suite.manifest, out, suite.catalog, suite.address), suite.folder, "kills") as driver:
        for point in points:
            driver.start()
            watch.wait_for(point, driver.alive)
            driver.kill()
        driver.start()
        rc = driver.wait()
    seconds = time.monotonic() - started
    assert rc == 0, driver.err_tail()
    suite.record(check_outcome("2 driver SIGKILLed x3 + rerun", out, suite.ids, watch.writes, seconds,
                               f"killed at {points} ok rows"))


def test_s3_down_for_10_then_60_seconds(suite, s3_server):
    bucket = s3_server.create_bucket("faults-outage")
    out = f"{bucket}/outage"
    rng = seeded(3)
    first = rng.randint(6, 12)
    outages = [(first, 10.0), (first + rng.randint(10, 16), 60.0)]
    started = time.monotonic()
    notes = f"down at {[p for p, _ in outages]} ok rows"
    with OutputWatch(s3_outputs(s3_server.client(retries=1), out)) as watch:
        job = JobThread(lambda: run(suite.job(out)))
        job.start()
        for point, down_s in outages:
            watch.wait_for(point, job.is_alive)
            s3_server.halt()
            try:
                time.sleep(down_s)  # the outage's length; what triggers it is the count above
            finally:
                s3_server.resume()
        report = job.outcome()
        if report.counts.get("failed"):  # output writes that outlived boto's own retries: a rerun finishes them
            notes += f"; rerun for {report.failures}"
            rerun = run(suite.job(out))
            assert rerun.counts == {"ok": report.counts["failed"]}
    seconds = time.monotonic() - started
    assert report.counts.get("ok", 0) + report.counts.get("failed", 0) == ROWS
    suite.record(check_outcome("3 S3 down 10 s and 60 s", out, suite.ids, watch.writes, seconds, notes))


def test_s3_slowdown_on_a_share_of_puts(suite, s3_server, monkeypatch):
    bucket = s3_server.create_bucket("faults-slowdown")
    out = f"{bucket}/slowdown"
    started = time.monotonic()
    with SlowDownProxy(s3_server.endpoint, put_failure_rate=0.25, seed=SEED) as proxy, \
            OutputWatch(s3_outputs(s3_server.client(retries=1), out)) as watch:
        with monkeypatch.context() as env:
            env.setenv("AWS_ENDPOINT_URL", proxy.endpoint)  # the driver's, and through storage_env the actors'
            report = run(suite.job(out))
    seconds = time.monotonic() - started
    assert report.counts == {"ok": ROWS}, report.failures
    assert proxy.injected > 0
    suite.record(check_outcome("4 S3 503 SlowDown on 25% PUTs", out, suite.ids, watch.writes, seconds,
                               f"{proxy.injected} of {proxy.puts} PUTs refused"))


def test_results_folder_blocked_then_restored_within_the_deadline(suite, caplog):
    out = str(suite.folder / "blocked-briefly")
    rng = seeded(5)
    block_at = rng.randint(8, 14)
    restore_at = block_at + rng.randint(12, 18)
    started = time.monotonic()
    with OutputWatch(local_outputs(out)) as watch:
        job = JobThread(lambda: run(suite.job(out)))
        job.start()
        watch.wait_for(block_at, job.is_alive)
        with results_folder_blocked(Path(out)) as restore:
            watch.wait_for(restore_at, job.is_alive)
            wait_until(lambda: failed_writes(caplog), job.is_alive)  # the driver may lag the outputs a little
            restore()
        report = job.outcome()
    seconds = time.monotonic() - started
    assert report.counts == {"ok": ROWS}
    retries = failed_writes(caplog)
    # A part being written as the folder moved may leave its temporary behind; the next run removes it.
    again = run(suite.job(out))
    assert again.skipped == ROWS
    suite.record(check_outcome("5a results folder blocked briefly", out, suite.ids, watch.writes, seconds,
                               f"blocked {block_at}..{restore_at} ok rows, "
                               f"{len(retries)} failed writes retried"))


def failed_writes(caplog) -> list:
    return [r for r in caplog.records if "cannot write results part" in r.getMessage()]


def wait_until(condition, alive, timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert alive() and time.monotonic() < deadline, "the awaited event never came"
        time.sleep(0.02)


def test_results_folder_blocked_past_the_deadline_stops_cleanly_then_resumes(suite):
    out = str(suite.folder / "blocked-long")
    point = seeded(6).randint(10, 20)
    cmd = cli_command(suite.manifest, out, suite.catalog, suite.address, "--results-deadline-seconds", "3")
    started = time.monotonic()
    with OutputWatch(local_outputs(out)) as watch, Driver(cmd, suite.folder, "deadline") as driver:
        driver.start()
        watch.wait_for(point, driver.alive)
        with results_folder_blocked(Path(out)):
            rc = driver.wait()
        stderr = driver.stderr.read_text(errors="replace")
        assert rc == JobStopped.exit_code, stderr[-4000:]
        assert "Traceback" not in stderr, stderr[-4000:]
        stops = [line for line in stderr.splitlines() if line.startswith("error: the job stopped")]
        assert len(stops) == 1, stderr[-4000:]
        print(f"\n[faults] the stop, as printed: {stops[0]}")
        resume = shlex.split(stops[0].split("resume with: ", 1)[1])
        assert resume == cmd, "the printed command is not the one that ran"
        saved = read_results(out).num_rows  # what the paragraph says was recorded is what is there
        assert f"Saved: {saved} results recorded" in stops[0]
        driver.cmd = resume
        driver.start()
        assert driver.wait() == 0, driver.err_tail()
    seconds = time.monotonic() - started
    suite.record(check_outcome("5b results blocked past deadline", out, suite.ids, watch.writes, seconds,
                               f"blocked at {point} ok rows; exit {rc}, "
                               f"{saved} recorded before the stop; resumed with the printed command"))
