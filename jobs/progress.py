"""Progress for long jobs: a live line on a terminal, one line per interval in logs."""

from __future__ import annotations

import sys
import time
from typing import TextIO


class Progress:
    def __init__(self, total: int, stream: TextIO | None = None, interval_s: float = 10.0, started: float | None = None):
        self.total = total
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.interval_s = 0.2 if self.tty else interval_s
        self.counts = {"ok": 0, "failed": 0, "filtered": 0}
        self.started = time.monotonic() if started is None else started
        self._last = 0.0
        self.first_s: float | None = None

    @property
    def done(self) -> int:
        return sum(self.counts.values())

    def rate(self) -> float:
        elapsed = time.monotonic() - self.started
        return self.done / elapsed if elapsed > 0 else 0.0

    def update(self, statuses: list[str]) -> None:
        if self.first_s is None and statuses:
            self.first_s = time.monotonic() - self.started
        for s in statuses:
            self.counts[s] = self.counts.get(s, 0) + 1
        now = time.monotonic()
        if now - self._last >= self.interval_s or self.done == self.total:
            self._last = now
            self._print()

    def _print(self) -> None:
        pct = 100.0 * self.done / self.total if self.total else 100.0
        line = (
            f"[renderfleet] {self.done}/{self.total} rows ({pct:.0f}%)  ok={self.counts['ok']} "
            f"failed={self.counts['failed']} filtered={self.counts['filtered']}  {self.rate():.2f} rows/s"
        )
        if self.tty:
            self.stream.write("\r\x1b[2K" + line)
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()
