"""Stores outputs the gateway has already answered with (`b64_json`), after the response, within a memory bound.

The response never waits on the store; it waits only when the bytes of writes still pending pass the bound,
so a slow store slows answers down instead of growing the gateway's memory without limit.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from storage.fs import write_retrying

log = logging.getLogger(__name__)

MAX_PENDING_BYTES = 256 * 2**20


class OutputWrites:
    """Background writes of `written: False` results; failures are logged and counted, never raised to callers."""

    def __init__(self, counter: Any, deadline_s: float = 60.0, max_pending_bytes: int = MAX_PENDING_BYTES):
        self.counter = counter  # Prometheus counter with a `result` label
        self.deadline_s = deadline_s
        self.max_pending_bytes = max_pending_bytes
        self.pending_bytes = 0
        self._tasks: set[asyncio.Task] = set()

    async def submit(self, results: list[dict[str, Any]]) -> None:
        """Starts storing each unwritten output; waits only while pending writes hold more than the bound."""
        for r in results:
            if r.get("status") != "ok" or r.get("written", True):
                continue
            self.pending_bytes += len(r["data"])
            task = asyncio.get_running_loop().create_task(self._write(r["output_uri"], r["data"], r.get("content_type")))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        while self.pending_bytes > self.max_pending_bytes and self._tasks:
            await asyncio.wait(set(self._tasks), return_when=asyncio.FIRST_COMPLETED)

    async def drain(self) -> None:
        """Waits for every pending write (shutdown, tests)."""
        while self._tasks:
            await asyncio.wait(set(self._tasks))

    async def _write(self, uri: str, data: bytes, content_type: str | None) -> None:
        try:
            await asyncio.to_thread(write_retrying, uri, data, content_type=content_type, deadline_s=self.deadline_s)
            self.counter.labels("ok").inc()
        except Exception:  # noqa: BLE001 - the caller already has its bytes; the store copy is best effort
            log.exception("storing %s after the response failed", uri)
            self.counter.labels("failed").inc()
        finally:
            self.pending_bytes -= len(data)
