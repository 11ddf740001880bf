"""Requests-per-minute windows shared by every gateway replica of one Serve app.

A window kept inside each replica lets a key through N times its rate behind N replicas, so the counts live in
one small actor per app (named after it, created by whichever replica asks first and owned by it, so it ends
with the app; when its owner stops first, on a crash or redeploy, the counts go with it and the next replica to
ask creates a new one). Replicas send the key's current limit with each call, so keys-file edits apply at once and
the actor holds only timestamps. One actor call per limited request, bounded by `timeout_s`; when the actor
cannot answer (starting, dead with the replica that owned it, too slow) the replica counts in its own window
(the old per-replica behaviour), logs the change once and reconnects in the background. Each replica also
notes the requests the actor admitted, so its fallback window starts from what it really let through. A call
that timed out may still have been counted by the actor: a slow window errs towards refusing, never a hang.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import math
import threading
import time
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)

WINDOW_S = 60.0


class MinuteWindows:
    """Sliding windows of admitted requests per key: the actor's state and each replica's fallback."""

    def __init__(self, window_s: float = WINDOW_S, clock: Callable[[], float] = time.monotonic):
        self.window_s, self.clock = window_s, clock
        self._windows: dict[str, collections.deque[float]] = {}
        self._swept = clock()

    def admit(self, key: str, limit: int) -> int:
        """0 when the request fits the key's window (it is counted), else whole seconds until one would."""
        now = self._prune(key)
        window = self._windows.setdefault(key, collections.deque())
        if len(window) >= limit:
            return max(1, math.ceil(window[len(window) - limit] + self.window_s - now))
        window.append(now)
        return 0

    def note(self, key: str) -> None:
        """Counts a request admitted elsewhere (by the shared window), without checking."""
        now = self._prune(key)  # first: pruning drops a key's empty window
        self._windows.setdefault(key, collections.deque()).append(now)

    def _prune(self, key: str) -> float:
        now = self.clock()
        if now - self._swept >= self.window_s:  # keys nobody asks about again must not hold memory
            self._swept = now
            for k in list(self._windows):
                self._drop_old(k, now)
        self._drop_old(key, now)
        return now

    def _drop_old(self, key: str, now: float) -> None:
        window = self._windows.get(key)
        while window and window[0] <= now - self.window_s:
            window.popleft()
        if window is not None and not window:
            del self._windows[key]


class WindowsActor:
    """The shared windows (run as a Ray actor, one call at a time, so admits never race)."""

    def __init__(self) -> None:
        self.windows = MinuteWindows()

    def admit(self, key: str, limit: int) -> int:
        return self.windows.admit(key, limit)

    def ping(self) -> bool:
        return True


NAMESPACE = "serve"  # where Serve keeps its own actors: every replica, and operators, find the window here


def actor_name(app_name: str) -> str:
    return f"renderfleet-key-windows:{app_name}"


class SharedWindows:
    """A replica's side of its app's windows: the actor when it answers in time, else the replica's own."""

    def __init__(self, app_name: str | None, timeout_s: float = 1.0, connect_timeout_s: float = 30.0,
                 retry_every_s: float = 10.0, startup_wait_s: float = 30.0):
        self.app_name, self.timeout_s = app_name, timeout_s
        self.connect_timeout_s, self.retry_every_s = connect_timeout_s, retry_every_s
        self.local = MinuteWindows()
        self._actor: Any = None
        self._connecting: threading.Thread | None = None
        self._next_try = 0.0
        self._shared = True  # what was last logged: a change to the fallback (or back) is logged once
        if app_name:  # a replica starts with the actor ready (bounded), so its first requests count together
            self._connect_soon()
            if self._connecting:
                self._connecting.join(startup_wait_s)

    async def admit(self, key: str, limit: int) -> int:
        """0 when admitted, else the Retry-After seconds; never waits longer than `timeout_s` on the actor."""
        actor = self._actor
        if actor is None:
            self._connect_soon()
        else:
            try:
                retry = int(await asyncio.wait_for(actor.admit.remote(key, limit), self.timeout_s))
            except Exception as e:  # noqa: BLE001 - timeout, actor died, Ray unavailable: all mean "count here"
                self._lost(actor, e)
            else:
                if not retry:
                    self.local.note(key)
                self._use_shared(True, None)
                return retry
        return self.local.admit(key, limit)

    def _lost(self, actor: Any, error: BaseException) -> None:
        if self._actor is actor:
            self._actor = None
        self._use_shared(False, error)
        self._connect_soon()

    def _use_shared(self, shared: bool, error: BaseException | None) -> None:
        if shared != self._shared:
            self._shared = shared
            if shared:
                log.warning("rate limits of app %s are counted across its gateway replicas again", self.app_name)
            else:
                log.warning("rate limits of app %s are counted per gateway replica until the shared window answers: %s",
                            self.app_name, f"{type(error).__name__}: {str(error) or f'no answer in {self.timeout_s:g} s'}")

    def _connect_soon(self) -> None:
        """Starts one background connect, at most once per `retry_every_s`: requests never wait for it."""
        now = time.monotonic()
        if not self.app_name or (self._connecting and self._connecting.is_alive()) or now < self._next_try:
            return
        self._next_try = now + self.retry_every_s
        self._connecting = threading.Thread(target=self._connect, name="key-windows-connect", daemon=True)
        self._connecting.start()

    def _connect(self) -> None:
        try:
            import ray

            if not ray.is_initialized():  # never start a Ray cluster of our own (unit tests, plain processes)
                raise RuntimeError("Ray is not initialized")
            actor = ray.remote(WindowsActor).options(name=actor_name(self.app_name or ""), namespace=NAMESPACE,
                                                      get_if_exists=True, num_cpus=0, max_concurrency=1).remote()
            ray.get(actor.ping.remote(), timeout=self.connect_timeout_s)
        except Exception as e:  # noqa: BLE001 - the fallback window covers it; retried later
            self._use_shared(False, e)
            return
        self._actor = actor
