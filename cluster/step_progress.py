"""Denoising steps from a model replica to the gateway that runs the job, through the store.

Serve routes a job's rows to any replica, so the job runner cannot ask "its" replica. Instead each job row
carries `progress_uri` (a key beside the job's record, see cluster/job_store.py); the renderer writes
`{"steps_done": k, "steps_total": n}` there while the row renders and deletes it when the call ends, and the
runner reads it on its heartbeat (a key it saw that is gone now means all of that row's steps are done).
Writes run on one background thread, at most one per key per interval, latest value wins: a slow or failing
store never slows or fails a render. Rows without the key (batch renders, requests answered inline) cost nothing.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from pipelines.progress import StepReport
from storage.fs import delete, join, write_bytes

log = logging.getLogger(__name__)

INTERVAL_S = 1.0  # per key; the runner reads on its heartbeat (a third of the job lease, 1 s at its shortest)
_DELETE = None  # a pending delete, in place of a payload


def progress_uris(out: str, rows: list[dict[str, Any]]) -> list[str]:
    """The rows' progress keys, only those under the store's jobs/ folder (a row cannot aim writes elsewhere)."""
    root = join(out, "jobs").rstrip("/") + "/"
    uris = []
    for row in rows:
        uri = row.get("progress_uri")
        if isinstance(uri, str) and uri.startswith(root) and "/" not in uri[len(root):] and uri.endswith(".json"):
            uris.append(uri)
        elif uri is not None:
            log.warning("row %r: ignoring progress_uri outside %s", row.get("id"), root)
    return uris


class ProgressWriter:
    """The latest step count per key, written off the render thread; its thread starts on first use."""

    def __init__(self, interval_s: float = INTERVAL_S):
        self.interval_s = interval_s
        self._pending: dict[str, bytes | None] = {}
        self._written: dict[str, float] = {}  # key -> monotonic time of its last write
        self._wake = threading.Condition()
        self._thread: threading.Thread | None = None
        self.writes = 0  # for tests and stats
        self.failures = 0

    @contextmanager
    def reporting(self, uris: list[str]) -> Iterator[StepReport | None]:
        """A step report that writes to every key of one pipeline call (None when there are none); the keys
        are deleted when the call ends, however it ends."""
        if not uris:
            yield None
            return

        reported = []

        def report(done: int, total: int) -> None:
            payload = json.dumps({"steps_done": done, "steps_total": total}).encode()
            reported.append(True)
            with self._wake:
                for uri in uris:
                    self._pending[uri] = payload
                self._start()
                self._wake.notify()

        try:
            yield report
        finally:
            if reported:  # a family that reports no steps wrote nothing to delete
                with self._wake:
                    for uri in uris:
                        self._pending[uri] = _DELETE
                    self._start()
                    self._wake.notify()

    def _start(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._run, name="step-progress", daemon=True)
            self._thread.start()

    def _due(self, now: float) -> tuple[list[tuple[str, bytes | None]], float | None]:
        """Keys to act on now (deletes always; writes once their interval is over) and the wait for the next."""
        due, wait = [], None
        for uri, payload in list(self._pending.items()):
            left = self._written.get(uri, -self.interval_s) + self.interval_s - now
            if payload is _DELETE or left <= 0:
                due.append((uri, self._pending.pop(uri)))
            else:
                wait = left if wait is None else min(wait, left)
        return due, wait

    def _run(self) -> None:
        while True:
            with self._wake:
                due, wait = self._due(time.monotonic())
                while not due:
                    self._wake.wait(wait if wait is not None else 60.0)
                    due, wait = self._due(time.monotonic())
            for uri, payload in due:
                self._apply(uri, payload)

    def _apply(self, uri: str, payload: bytes | None) -> None:
        try:
            if payload is _DELETE:
                self._written.pop(uri, None)
                delete(uri)
            else:
                self._written[uri] = time.monotonic()
                write_bytes(uri, payload, "application/json")
                self.writes += 1
        except Exception as e:  # noqa: BLE001 - progress is a courtesy; never a render failure
            self.failures += 1
            log.warning("cannot %s step progress %s: %s", "delete" if payload is _DELETE else "write", uri, e)
