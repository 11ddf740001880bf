"""A catalog model on Ray Serve, and how the gateway calls it: all of a request's rows, or none of them.

A request fails whole. When one row fails (over capacity, a replica gone, a bad row), the gateway cancels
the others and nothing the request rendered stays in the store: outputs that finished first are deleted
by the gateway; rows already rendering finish on their replica, which deletes what they wrote.
"""

import asyncio
import itertools
import logging
import time
import uuid
from typing import Any

from ray import serve
from ray.exceptions import RayActorError, TaskCancelledError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, ReplicaUnavailableError

from cluster.api import APIError, failure_error, public_message
from cluster.renderer import Rendered, Renderer, RendererConfig
from storage.fs import delete

log = logging.getLogger(__name__)

RETRY_AFTER_S = 1  # what 503s tell clients to wait
# Call failures that mean "this model cannot take the request now" (a 503 with Retry-After), besides backpressure.
UNAVAILABLE = (RayActorError, ReplicaUnavailableError, DeploymentUnavailableError, TaskCancelledError)
_CLEANUPS: set[asyncio.Future] = set()  # background deletions of failed requests' outputs (kept referenced)


class CallTaggingRenderer(Renderer):
    """The Renderer with each result naming the pipeline call that rendered it: `call_id` (unique per replica) and
    `call_rows` (the rows, from any request, that call rendered), so responses show which requests shared a call.

    One `Rendered` group is one call's outputs (a family that cannot batch runs its group's rows one at a time)."""

    def __init__(self, config: RendererConfig):
        super().__init__(config)
        self._replica = uuid.uuid4().hex[:8]
        self._calls = itertools.count(1)  # next() is atomic: two batches may finish at once

    def _finish_group(self, group: Rendered, rows: list[dict[str, Any]], keep_data: bool,
                      caller_writes: frozenset[str] = frozenset()) -> list[tuple[Any, dict[str, Any]]]:
        call = f"{self._replica}-{next(self._calls)}"
        return [(job, dict(result, call_id=call, call_rows=len(group.jobs)))
                for job, result in super()._finish_group(group, rows, keep_data, caller_writes)]


@serve.deployment
class ModelServer:
    """One catalog model: a Renderer, fed by Serve's dynamic batching."""

    def __init__(self, config: RendererConfig, max_batch_size: int, batch_wait_timeout_s: float):
        self.renderer = CallTaggingRenderer(config)
        self._render_batch.set_max_batch_size(max_batch_size)
        self._render_batch.set_batch_wait_timeout_s(batch_wait_timeout_s)
        self._wait_s = batch_wait_timeout_s
        self._active = 0  # rows queued or rendering here
        self._waits = {"immediate": 0, "windowed": 0}  # batch windows opened by lone rows vs. rows with company
        self._abandoned: dict[str, float] = {}  # row id -> when its caller cancelled, until its batch ends
        self._unclaimed: dict[str, str] = {}  # row id -> output uri, rendered but not yet handed back

    async def render(self, row: dict[str, Any], caller_writes: bool = False) -> dict[str, Any]:
        """One row. A caller that cancels keeps nothing in the store, even when its batch had already started.

        With caller_writes the output is finished but not stored here: an `ok` result carries its bytes
        (`data`, `written: False`) and the caller stores them at `output_uri` once it has answered.
        """
        # Adaptive batching: a lone row opens a zero-length window (Serve reads the wait when a batch's first
        # row arrives); the window only opens when other rows are here to share the pipeline call.
        lone = self._active == 0
        self._render_batch.set_batch_wait_timeout_s(0.0 if lone else self._wait_s)
        self._waits["immediate" if lone else "windowed"] += 1
        self._active += 1
        try:
            result = await self._render_batch((row, caller_writes))
        except asyncio.CancelledError:
            uri = self._unclaimed.pop(row["id"], None)
            if uri:
                delete(uri)
            else:  # queued (Serve drops it) or rendering (its batch deletes the output)
                self._abandoned[row["id"]] = time.monotonic()
            raise
        finally:
            self._active -= 1
        self._unclaimed.pop(row["id"], None)
        return result

    async def stats(self) -> dict[str, Any]:
        """Batch windows opened (immediate for lone rows) and the renderer's overlap bound and peak."""
        return {**self._waits, "active": self._active, **self.renderer.overlap.stats()}

    # Two batches at once: the renderer renders one while it finishes and stores the other.
    @serve.batch(max_batch_size=4, batch_wait_timeout_s=0.05, max_concurrent_batches=2)
    async def _render_batch(self, calls: list[tuple[dict[str, Any], bool]]) -> list[dict[str, Any]]:
        rows = [row for row, _ in calls]
        theirs = [row["id"] for row, caller_writes in calls if caller_writes]
        started = time.perf_counter()
        results = await asyncio.to_thread(self.renderer.render_rows, rows, False, theirs)
        elapsed = time.perf_counter() - started
        for r in results:
            uri = r.get("output_uri") if r["status"] == "ok" and r.get("written", True) else None
            if self._abandoned.pop(r["id"], None) is not None:
                if uri:
                    delete(uri)
            elif uri:
                self._unclaimed[r["id"]] = uri
        stale = time.monotonic() - 600  # rows cancelled while queued never reach a batch
        self._abandoned = {k: t for k, t in self._abandoned.items() if t > stale}
        return [dict(r, batch_size=len(rows), batch_s=elapsed) for r in results]


async def render_all(calls: list[Any]) -> tuple[list[dict], BaseException | dict | None]:
    """Every row's result (from `handle.render.remote(row)` calls), or the first failure, an error or a failed
    row, with the other calls cancelled and their outputs deleted."""
    waits = [asyncio.ensure_future(c) for c in calls]
    pending: set[asyncio.Future] = set(waits)
    failure: BaseException | dict | None = None
    try:
        while pending and failure is None:
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            failure = next((f for f in map(_failure_of, sorted(done, key=waits.index)) if f is not None), None)
    except asyncio.CancelledError:  # the client went away
        _abandon(calls, waits)
        raise
    if failure is not None:
        _abandon(calls, waits)
        return [], failure
    return [w.result() for w in waits], None


def _failure_of(wait: asyncio.Future) -> BaseException | dict | None:
    """A finished call's failure: its exception, or its row when that did not render."""
    if wait.cancelled():
        return asyncio.CancelledError()
    if wait.exception() is not None:
        return wait.exception()
    return None if wait.result()["status"] == "ok" else wait.result()


def _abandon(calls: list[Any], waits: list[asyncio.Future]) -> None:
    """Cancels the calls still running and, in the background, deletes every output the calls stored."""
    for call, wait in zip(calls, waits):
        if not wait.done():
            try:
                call.cancel()  # best effort; it raises the call's own error when that came first
            except Exception:  # noqa: BLE001
                pass

    async def cleanup() -> None:
        await asyncio.gather(*waits, return_exceptions=True)
        for w in waits:
            if not w.cancelled() and w.exception() is None and w.result().get("output_uri") and w.result().get("written", True):
                await asyncio.to_thread(delete, w.result()["output_uri"])

    task = asyncio.ensure_future(cleanup())
    _CLEANUPS.add(task)
    task.add_done_callback(_CLEANUPS.discard)


def call_error(model: str, failure: BaseException | dict, uploads: dict[str, str] | None = None) -> APIError:
    """The HTTP error for a failed call or row: 503 + Retry-After when the model cannot take it now; a row's
    own reason otherwise, its message naming uploads (uri -> form field) by their field, never a server path."""
    retry = {"Retry-After": str(RETRY_AFTER_S)}
    if isinstance(failure, BackPressureError):
        return APIError(503, f"model {model!r} is at capacity; retry shortly", type_="server_error", code="overloaded",
                        headers=retry)
    if isinstance(failure, UNAVAILABLE):
        log.warning("model %s call failed: %s", model, failure)
        return APIError(503, f"model {model!r} is unavailable (a replica stopped); retry shortly", type_="server_error",
                        code="model_unavailable", headers=retry)
    if isinstance(failure, BaseException):
        log.error("model %s call failed: %r", model, failure)
        return APIError(500, f"model {model!r} failed ({type(failure).__name__})", type_="server_error",
                        code="internal_error")
    if failure["status"] == "filtered":
        return APIError(400, f"request blocked by the content policy: {failure.get('filter_reason')}",
                        code="content_policy_violation")
    error = failure_error(failure.get("error") or "internal_error: render failed")
    error.message = public_message(error.message, uploads)
    return error
