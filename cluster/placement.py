"""Whether a model can take a request now: replica states from Serve's controller, watched while a request waits.

A model that scales from zero gets its first replica because a request is waiting at its handle, so the request
is sent first and watched: once a replica runs, the request proceeds however long it renders; if none runs
within the placement timeout and no node can hold one, or none runs within the load timeout although a node
could (the cluster stays busy, or the checkpoint never finishes loading), the request is cancelled and
answered 503 with the reason, instead of waiting in Serve's queue until the client gives up.
"""

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Any, Awaitable, TypeVar

from cluster.api import APIError

log = logging.getLogger(__name__)

T = TypeVar("T")
FAILED = ("UNHEALTHY", "DEPLOY_FAILED")


@dataclass(frozen=True)
class ModelState:
    """One model deployment as the controller last reported it."""

    status: str
    running: int
    starting: int
    message: str = ""


def app_states(app_name: str) -> dict[str, ModelState]:
    """Every deployment of an application, by deployment name (blocking: one controller call)."""
    from ray import serve

    app = serve.status().applications.get(app_name)
    if app is None:
        return {}
    states = {}
    for name, d in app.deployments.items():
        counts = {str(getattr(k, "value", k)): v for k, v in d.replica_states.items()}
        states[name] = ModelState(str(getattr(d.status, "value", d.status)), counts.get("RUNNING", 0),
                                  sum(v for k, v in counts.items() if k != "RUNNING"), d.message or "")
    return states


def unplaceable_reason(needs: dict[str, float], nodes: list[dict[str, float]]) -> str | None:
    """Why no node can hold a replica asking `needs` (CPU, GPU, custom resources), or None when one could: each
    resource no node has enough of, against the node with the most of it."""
    needs = {k: v for k, v in needs.items() if v}
    if any(all(n.get(k, 0) >= v for k, v in needs.items()) for n in nodes):
        return None
    most = {k: max((n.get(k, 0) for n in nodes), default=0) for k in needs}
    short = [f"{k} {v:g} ({f'largest node: {most[k]:g}' if most[k] else 'no node has any'})"
             for k, v in needs.items() if v > most[k]]
    if short:
        return "a replica needs " + ", ".join(short)
    return "no single node has all of " + ", ".join(f"{k} {v:g}" for k, v in needs.items())


class Placement:
    """The gateway's view of its models' replicas, refreshed at most every `poll_s` while requests wait."""

    def __init__(self, app_name: str, needs: dict[str, dict[str, float]], timeout_s: float, poll_s: float = 0.5,
                 load_timeout_s: float | None = None):
        self.app_name, self.needs, self.timeout_s, self.poll_s = app_name, needs, timeout_s, poll_s
        # A replica some node can hold is starting (scheduled, loading its checkpoint): a cold start gets this long.
        self.load_timeout_s = max(timeout_s, load_timeout_s if load_timeout_s is not None else 10 * timeout_s)
        self._states: dict[str, ModelState] = {}
        self._read_at = float("-inf")
        self._lock = asyncio.Lock()

    async def state(self, model: str, fresh: bool = True) -> ModelState | None:
        """The model deployment's state (re-read when older than poll_s and `fresh`)."""
        async with self._lock:
            if fresh and time.monotonic() - self._read_at >= self.poll_s:
                try:
                    self._states = await asyncio.to_thread(app_states, self.app_name)
                except Exception as e:  # noqa: BLE001 - the controller is busy or restarting: keep the last view
                    log.warning("cannot read Serve's status: %s", e)
                self._read_at = time.monotonic()
        return self._states.get(f"model-{model}")

    async def guard(self, model: str, work: Awaitable[T]) -> T:
        """Awaits `work` (the model calls), answering 503 if no replica of `model` runs within the timeout."""
        task = asyncio.ensure_future(work)
        known = await self.state(model, fresh=False)
        if known is not None and known.running:
            return await task
        started = time.monotonic()
        deadline = started + self.timeout_s
        try:
            while True:
                done, _ = await asyncio.wait({task}, timeout=self.poll_s)
                if done:
                    return task.result()
                state = await self.state(model)
                if state is None or state.running:
                    return await task
                if state.status in FAILED:
                    raise APIError(503, f"model {model!r} cannot start: {state.message or state.status}",
                                   type_="server_error", code="model_start_failed", headers=self.retry())
                if time.monotonic() >= deadline:
                    why = await self._why(model)
                    if why is None and deadline < started + self.load_timeout_s:
                        deadline = started + self.load_timeout_s  # placeable: a cold start, not a stuck model
                        continue
                    raise APIError(503, self._unplaced(model, why, time.monotonic() - started), type_="server_error",
                                   code="model_unplaceable", headers=self.retry())
        except BaseException:
            task.cancel()
            raise

    async def _why(self, model: str) -> str | None:
        """Why no node can hold the model's replica, None when one could (then it is busy or still loading)."""
        from cluster.resources import node_resources

        return unplaceable_reason(self.needs.get(model, {}), await asyncio.to_thread(node_resources))

    def _unplaced(self, model: str, why: str | None, waited_s: float) -> str:
        lead = f"no replica of model {model!r} could be placed within {waited_s:.0f} s"
        return f"{lead}: {why}" if why else f"{lead}: the cluster is busy or the model is still loading; retry later"

    def retry(self) -> dict[str, str]:
        """Retry-After for placement 503s: a fraction of the timeout, at least a second."""
        return {"Retry-After": str(max(1, int(self.timeout_s / 2)))}


def warm_and_cold(app_name: str) -> tuple[list[str], list[str]]:
    """The application's models with a running replica, and those at zero (blocking)."""
    states = {n.removeprefix("model-"): s for n, s in app_states(app_name).items() if n.startswith("model-")}
    return sorted(n for n, s in states.items() if s.running), sorted(n for n, s in states.items() if not s.running)


def wait_ready(app_name: str, base_url: str, warm: list[str], timeout_s: float, poll_s: float = 0.5) -> dict[str, Any]:
    """Blocks until the HTTP port answers /healthz and every model in `warm` has a running replica; returns what
    is served (TimeoutError naming what is missing otherwise)."""
    import httpx

    deadline = time.monotonic() + timeout_s
    missing: list[str] = warm
    http_ok = False
    while time.monotonic() < deadline:
        try:
            http_ok = httpx.get(base_url.rstrip("/") + "/healthz", timeout=5).status_code == 200
        except httpx.HTTPError:
            http_ok = False
        running, cold = warm_and_cold(app_name)
        missing = [m for m in warm if m not in running]
        if http_ok and not missing:
            return {"warm": running, "cold": cold}
        time.sleep(poll_s)
    raise TimeoutError(f"not ready after {timeout_s:g} s: " + ("HTTP port not answering; " if not http_ok else "")
                       + (f"no running replica for {', '.join(missing)}" if missing else ""))
