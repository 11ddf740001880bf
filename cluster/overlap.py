"""Overlap inside one renderer: the next batch's pipeline call starts while the previous batch is finished
(safety check, watermark, encoding, metadata, durable write), so the accelerator never waits on the CPU work.

A batch holds one of `depth` slots from before its render until its outputs are written, so at most `depth`
batches of decoded outputs exist per actor (memory stays flat); one renders at a time, the others finish.
Callers bring the concurrency: Ray Data runs `depth` calls per actor (`render_pool`), Serve `depth` batches.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ray.data import ActorPoolStrategy

EVENTS_KEPT = 4096  # recent render/finish events per actor, for tests and profiling


class Overlap:
    """The gates one Renderer's batches pass: a bounded slot, the render lock, the finishing slots."""

    def __init__(self, depth: int):
        self.depth = max(1, depth)
        self._slots = threading.BoundedSemaphore(self.depth)
        self._render = threading.Lock()  # pipelines, the model pool and torch state: one call at a time
        self._finish = threading.BoundedSemaphore(max(1, self.depth - 1))
        self._lock = threading.Lock()
        self._numbers = itertools.count()
        self.events: deque[tuple[float, int, str]] = deque(maxlen=EVENTS_KEPT)  # (monotonic time, batch, event)
        self.pending = 0  # batches rendered whose outputs are not yet written
        self.peak_pending = 0

    @contextmanager
    def batch(self) -> Iterator[int]:
        """A slot for one batch from render to written outputs; yields the batch's number."""
        with self._slots:
            yield next(self._numbers)

    @contextmanager
    def rendering(self, batch: int) -> Iterator[None]:
        with self._render:
            self._mark(batch, "render_start")
            yield
            self._mark(batch, "render_end")
            with self._lock:  # from here the batch's outputs wait for (or are in) finishing
                self.pending += 1
                self.peak_pending = max(self.peak_pending, self.pending)

    @contextmanager
    def finishing(self, batch: int) -> Iterator[None]:
        """Entered exactly once after a successful `rendering` of the same batch."""
        try:
            with self._finish:
                self._mark(batch, "finish_start")
                try:
                    yield
                finally:
                    self._mark(batch, "finish_end")
        finally:
            with self._lock:
                self.pending -= 1

    def _mark(self, batch: int, event: str) -> None:
        with self._lock:
            self.events.append((time.monotonic(), batch, event))

    def stats(self) -> dict[str, float]:
        """The bound, the peak of pending batches, and how much finishing ran beside a pipeline call."""
        with self._lock:
            events = list(self.events)
            peak = self.peak_pending
        finish_s, hidden_s = overlapped(events)
        return {"depth": self.depth, "peak_pending": peak, "finish_s": finish_s, "hidden_s": hidden_s}


def intervals(events: list[tuple[float, int, str]], kind: str) -> list[tuple[float, float]]:
    """(start, end) of every completed `kind` ("render" or "finish") in an event log."""
    starts = {b: t for t, b, e in events if e == f"{kind}_start"}
    return [(starts[b], t) for t, b, e in events if e == f"{kind}_end" and b in starts]


def overlapped(events: list[tuple[float, int, str]]) -> tuple[float, float]:
    """Seconds spent finishing, and of those the seconds during which a pipeline call ran (hidden)."""
    renders = intervals(events, "render")
    total = hidden = 0.0
    for start, end in intervals(events, "finish"):
        total += end - start
        hidden += sum(max(0.0, min(end, r_end) - max(start, r_start)) for r_start, r_end in renders)
    return total, hidden


def render_pool(workers: int, depth: int, max_workers: int | None = None) -> ActorPoolStrategy:
    """The renderer actor pool: `depth` calls per actor run at once, so one renders while the others finish.
    With `max_workers` above `workers` it is elastic: Ray Data adds actors while rows queue, up to the max."""
    from ray.data import ActorPoolStrategy  # here, so the renderer imports without Ray (bench gpu)

    sizes: dict[str, int] = ({"min_size": workers, "max_size": max_workers} if max_workers and max_workers > workers
                             else {"size": workers})
    if depth <= 1:
        return ActorPoolStrategy(**sizes)
    return ActorPoolStrategy(**sizes, max_concurrent_calls_per_actor=depth, enable_true_multi_threading=True)
