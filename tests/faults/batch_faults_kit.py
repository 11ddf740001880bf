"""Pieces of the batch fault suite: a manifest, a watch on outputs as they appear (faults fire at counts of
`ok` rows, never after a sleep), jobs run in a thread or as killable drivers, and the one final check."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow.compute as pc

from helpers import write_manifest
from storage.fs import is_s3, read_bytes, split_s3
from storage.results import FINAL_STATUSES, _read_parts, absolute_uri, read_results

ROWS = 48
SEED = 20261130
JOB_TIMEOUT_S = 420  # generous: nothing here may hang, and no test asserts a duration
Version = tuple[Any, ...]


def fault_manifest(path: str, rows: int = ROWS) -> tuple[str, list[str]]:
    """Tiny-sd rows at 64x64, 2 steps: a job of well under a minute on two CPUs."""
    records = [{"id": f"f-{i:03d}", "prompt": f"fault scene {i}", "num_inference_steps": 2, "width": 64, "height": 64}
               for i in range(rows)]
    return write_manifest(path, records), [r["id"] for r in records]


# ----------------------------------------------------------------------- watching outputs


def local_outputs(out: str) -> Callable[[], dict[str, Version]]:
    """Lists output files under a local OUT (not results/, runs/ or hidden temporaries) with a version each:
    (inode, mtime) changes on every atomic rewrite."""
    root = os.path.abspath(out)

    def listing() -> dict[str, Version]:
        found: dict[str, Version] = {}
        for dirpath, dirs, files in os.walk(root):
            if dirpath == root:
                dirs[:] = [d for d in dirs if d not in ("results", "runs", "results.aside")]
            for name in files:
                if not name.startswith("."):
                    path = os.path.join(dirpath, name)
                    try:
                        info = os.stat(path)
                    except FileNotFoundError:
                        continue
                    found[path] = (info.st_ino, info.st_mtime_ns)
        return found

    return listing


def s3_outputs(client: Any, out: str) -> Callable[[], dict[str, Version]]:
    """Lists output objects under an s3:// OUT (ETag and LastModified as the version); an outage lists nothing new."""
    bucket, key = split_s3(out)
    prefix = key.rstrip("/") + "/"

    def listing() -> dict[str, Version]:
        found: dict[str, Version] = {}
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            for obj in page.get("Contents", ()):
                rel = obj["Key"][len(prefix):]
                if rel.split("/", 1)[0] not in ("results", "runs"):
                    found[f"s3://{bucket}/{obj['Key']}"] = (obj["ETag"], obj["LastModified"])
        return found

    return listing


@dataclass
class OutputWatch:
    """Polls the outputs in a thread: how many exist (the `ok` rows so far) and how often each was written."""

    listing: Callable[[], dict[str, Version]]
    interval_s: float = 0.05
    writes: Counter[str] = field(default_factory=Counter)
    _seen: dict[str, Version] = field(default_factory=dict)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    @property
    def count(self) -> int:
        return len(self._seen)

    def poll(self) -> None:
        try:
            now = self.listing()
        except Exception:  # noqa: BLE001 - the store may be down on purpose
            return
        for key, version in now.items():
            if self._seen.get(key) != version:
                self._seen[key] = version
                self.writes[key] += 1

    def __enter__(self) -> "OutputWatch":
        def loop() -> None:
            while not self._stop.is_set():
                self.poll()
                self._stop.wait(self.interval_s)

        self._thread = threading.Thread(target=loop, name="output-watch", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        self.poll()

    def wait_for(self, n: int, alive: Callable[[], bool], timeout_s: float = JOB_TIMEOUT_S) -> None:
        """Blocks until `n` outputs exist; fails if the job ends first or nothing moves for the timeout."""
        deadline = time.monotonic() + timeout_s
        while self.count < n:
            assert alive(), f"the job ended with {self.count} outputs, before the fault at {n}"
            assert time.monotonic() < deadline, f"stuck at {self.count} outputs, waiting for {n}"
            time.sleep(0.02)


@contextmanager
def results_folder_blocked(out: Path) -> Iterator[Callable[[], None]]:
    """Moves OUT/results aside and puts a file in its place, so no results write can succeed (even as root,
    where a read-only chmod would not stop one); yields `restore`, which puts the folder back (also on exit)."""
    folder, aside = Path(out) / "results", Path(out) / "results.aside"
    folder.mkdir(parents=True, exist_ok=True)
    folder.rename(aside)
    folder.write_text("not a folder")
    restored = False

    def restore() -> None:
        nonlocal restored
        if not restored:
            folder.unlink()
            aside.rename(folder)
            restored = True

    try:
        yield restore
    finally:
        restore()


# ----------------------------------------------------------------------- running jobs


class JobThread(threading.Thread):
    """Runs a job (a callable) in a thread so the test thread can inject faults; keeps its result or error."""

    def __init__(self, fn: Callable[[], Any]):
        super().__init__(name="render-job", daemon=True)
        self.fn, self.result, self.error = fn, None, None

    def run(self) -> None:
        try:
            self.result = self.fn()
        except BaseException as e:  # noqa: BLE001 - handed to the test thread
            self.error = e

    def outcome(self, timeout_s: float = JOB_TIMEOUT_S) -> Any:
        self.join(timeout_s)
        assert not self.is_alive(), "the job did not finish in time"
        if self.error is not None:
            raise self.error
        return self.result


@dataclass
class Driver:
    """`renderfleet render` as a subprocess in its own process group, so it can be SIGKILLed whole and reaped."""

    cmd: list[str]
    log_dir: Path
    name: str = "driver"
    proc: subprocess.Popen | None = None
    runs: int = 0

    def start(self) -> "Driver":
        self.runs += 1
        self.stdout = self.log_dir / f"{self.name}-{self.runs}.out"
        self.stderr = self.log_dir / f"{self.name}-{self.runs}.err"
        with open(self.stdout, "wb") as out, open(self.stderr, "wb") as err:
            self.proc = subprocess.Popen(self.cmd, start_new_session=True, stdout=out, stderr=err,
                                         stdin=subprocess.DEVNULL)
        return self

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL to the driver's whole group, then reap it."""
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(timeout=60)

    def wait(self, timeout_s: float = JOB_TIMEOUT_S) -> int:
        assert self.proc is not None
        try:
            return self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"driver run {self.runs} did not finish in {timeout_s} s:\n{self.err_tail()}")

    def err_tail(self, n: int = 4000) -> str:
        return self.stderr.read_text(errors="replace")[-n:]

    def __enter__(self) -> "Driver":
        return self

    def __exit__(self, *exc: object) -> None:
        if self.alive():
            self.kill()


def cli_command(manifest: str, out: str, catalog: str, address: str, *extra: str) -> list[str]:
    return [sys.executable, "-m", "jobs.cli", "render", manifest, "--out", out, "--catalog", catalog,
            "--address", address, *JOB_FLAGS, *extra]


JOB_FLAGS = ("--workers", "2", "--batch-size", "4", "--results-flush-rows", "4", "--torch-threads", "1")
JOB_ARGS = {"workers": 2, "batch_size": 4, "results_flush_rows": 4, "torch_threads": 1}


def render_actor_pids(job_id: str) -> list[int]:
    """Pids of this job's live render actors, from the GCS actor table (the state API needs a dashboard)."""
    from ray._private import state

    return sorted(
        a["Pid"] for a in state.actors().values()
        if a["State"] == "ALIVE" and a["JobID"] == job_id and "MapWorker" in a["ActorClassName"] and a.get("Pid")
    )


# ----------------------------------------------------------------------- the one final check


@dataclass
class Figures:
    """One case's outcome; `store` names the undisturbed run it is timed against (measured once, warm)."""

    case: str
    store: str
    rows: int
    lost: int
    duplicated: int
    retried: int
    seconds: float
    notes: str = ""

    def line(self, baseline_s: float | None = None) -> str:
        versus = f" vs undisturbed {baseline_s:.1f}s (x{self.seconds / baseline_s:.1f})" if baseline_s else ""
        return (f"{self.case:<32} rows={self.rows} lost={self.lost} duplicated={self.duplicated} "
                f"retried={self.retried} time={self.seconds:.1f}s{versus}{'  ' + self.notes if self.notes else ''}")


def check_outcome(case: str, out: str, ids: list[str], writes: Counter[str], seconds: float, notes: str = "") -> Figures:
    """Every manifest id exactly once with a final status, every ok output present with its recorded sha256,
    nothing duplicated, nothing lost, nothing extra. `retried`: ids rendered more than once (an output written
    again, or more than one results row)."""
    results = read_results(out)
    got = Counter(results["id"].to_pylist())
    duplicated = sum(1 for n in got.values() if n > 1)
    final = results.filter(pc.is_in(results["status"], value_set=pc.cast(list(FINAL_STATUSES), "string")))
    lost = [i for i in ids if i not in set(final["id"].to_pylist())]
    extra = set(got) - set(ids)
    raw = _read_parts(out)
    recorded = Counter(raw["id"].to_pylist()) if raw is not None else Counter()
    by_uri = {absolute_uri(out, r["output_uri"]): r["id"] for r in results.to_pylist() if r["output_uri"]}
    retried = {i for i, n in recorded.items() if n > 1} | {by_uri[u] for u, n in writes.items() if n > 1 and u in by_uri}
    for r in results.to_pylist():
        if r["status"] == "ok":
            data = read_bytes(absolute_uri(out, r["output_uri"]))
            assert hashlib.sha256(data).hexdigest() == r["sha256"], f"{r['id']}: output differs from its sha256"
    figures = Figures(case, "s3" if is_s3(out) else "local", len(ids), len(lost), duplicated, len(retried), seconds, notes)
    print(f"\n[faults] {figures.line()}", flush=True)
    assert not lost, f"lost: {lost[:10]}"
    assert not duplicated and not extra, f"duplicated or unknown ids: {extra or got.most_common(3)}"
    if not is_s3(out):
        assert not list(Path(out, "results").rglob(".part-*.tmp")), "a temporary results part was left behind"
    return figures
