"""Progress for long jobs: a live bar on a terminal, one line per interval in logs; and the job's one rate."""

from __future__ import annotations

import shutil
import sys
import time
from dataclasses import dataclass
from typing import TextIO

STATUSES = ("ok", "failed", "filtered")
MIN_SPAN_S = 1.0  # below this after the first output, the steady rate is not measurable yet


@dataclass(frozen=True)
class Rate:
    """The job's speed, defined here only: rows finished per second measured from the first output (start-up
    and first model loads excluded: the rows of the first output batch start the clock, they are not counted),
    and of those the `ok` images per second. Until a span of MIN_SPAN_S with more rows exists, it falls back to
    rows over the whole elapsed time (`steady` False)."""

    rows_per_s: float
    images_per_s: float
    steady: bool

    @classmethod
    def measure(cls, done: int, ok: int, elapsed_s: float, first_s: float | None, first_rows: int) -> Rate:
        span = elapsed_s - (first_s or 0.0)
        if first_s is not None and span >= MIN_SPAN_S and done > first_rows:
            rows = (done - first_rows) / span
            steady = True
        else:
            rows = done / elapsed_s if elapsed_s > 0 else 0.0
            steady = False
        return cls(rows, rows * ok / done if done else 0.0, steady)

    def text(self) -> str:
        return f"{self.rows_per_s:.2f} rows/s ({self.images_per_s:.2f} images/s)"


def _duration(s: float) -> str:
    s = int(round(s))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


class Progress:
    def __init__(self, total: int, stream: TextIO | None = None, interval_s: float = 10.0, started: float | None = None,
                 clock=time.monotonic):
        self.total = total
        self.stream = stream or sys.stderr
        isatty = getattr(self.stream, "isatty", None)
        self.tty = bool(isatty and isatty())
        self.interval_s = 0.2 if self.tty else interval_s
        self.counts = {s: 0 for s in STATUSES}
        self.clock = clock
        self.started = clock() if started is None else started
        self._last = float("-inf")
        self._printed_done = -1
        self.first_s: float | None = None
        self.first_rows = 0
        self.elapsed_s = 0.0

    @property
    def done(self) -> int:
        return sum(self.counts.values())

    def rate(self, elapsed_s: float | None = None) -> Rate:
        elapsed = self.clock() - self.started if elapsed_s is None else elapsed_s
        return Rate.measure(self.done, self.counts.get("ok", 0), elapsed, self.first_s, self.first_rows)

    def update(self, statuses: list[str]) -> None:
        now = self.clock()
        if self.first_s is None and statuses:
            self.first_s = now - self.started
            self.first_rows = len(statuses)
        for s in statuses:
            self.counts[s] = self.counts.get(s, 0) + 1
        self.elapsed_s = now - self.started
        if now - self._last >= self.interval_s or self.done >= self.total:
            self._last = now
            self._print()

    def line(self) -> str:
        """The progress line: counts by status, the rate, and (on a terminal) a bar and the ETA."""
        done, total = self.done, self.total
        frac = done / total if total else 1.0
        rate = self.rate(self.elapsed_s)
        counts = " ".join(f"{s}={self.counts.get(s, 0)}" for s in STATUSES)
        eta = ""
        if done < total and rate.steady and rate.rows_per_s > 0:
            eta = f"  ETA {_duration((total - done) / rate.rows_per_s)}"
        elif done >= total:
            eta = f"  in {_duration(self.elapsed_s)}"
        speed = rate.text() if rate.steady else ("measuring rate" if done else "starting")
        if not self.tty:
            return f"[renderfleet] {done}/{total} rows ({100 * frac:.0f}%)  {counts}  {speed}{eta}"
        width = max(10, min(40, shutil.get_terminal_size((100, 24)).columns - 90))
        filled = int(width * frac)
        bar = "#" * filled + "-" * (width - filled)
        return f"[{bar}] {done}/{total} {100 * frac:3.0f}%  {counts}  {speed}{eta}"

    def _print(self) -> None:
        if self.tty:
            # Clear the line first: anything else written meanwhile (Ray's lines) ends on its own line.
            self.stream.write("\r\x1b[2K" + self.line())
        else:
            if self.done == self._printed_done:
                return
            self.stream.write(self.line() + "\n")
        self._printed_done = self.done
        self.stream.flush()

    def close(self) -> None:
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()
