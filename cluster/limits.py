"""API keys and their fair-use limits, read from a file that is re-read when it changes (no restart).

The file is either one key per line (no limits) or YAML:

    defaults: {requests_per_minute: 0, concurrent_jobs: 0}   # 0: unlimited
    keys:
      sk-team-a: {requests_per_minute: 60, concurrent_jobs: 2, models: [sd15, sdxl]}
      sk-team-b: {}

Requests per minute are counted across all gateway replicas of an app, in one shared window per key
(`cluster/key_window.py`): a request sends the key's current limit there and gets admitted or a Retry-After.
If that window cannot answer within a second, each replica counts in its own window until it does (a key may
then get up to N times its rate behind N replicas). Concurrent jobs are counted from the shared job store.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any

import yaml

from cluster.api import APIError
from cluster.key_window import SharedWindows


@dataclass(frozen=True)
class KeyRule:
    """One key's limits (0: unlimited) and the models it may use (empty: all)."""

    requests_per_minute: int = 0
    concurrent_jobs: int = 0
    models: tuple[str, ...] = ()


def parse_keys(text: str, where: str = "api keys file") -> dict[str, KeyRule]:
    """The keys and rules a keys file holds (ValueError naming what is wrong)."""
    try:
        data = yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError:
        data = None
    if not isinstance(data, dict):
        return {line.strip(): KeyRule() for line in text.splitlines() if line.strip() and not line.startswith("#")}
    unknown = set(data) - {"keys", "defaults"}
    if unknown:
        raise ValueError(f"{where}: unknown keys {', '.join(sorted(unknown))} (allowed: defaults, keys)")
    defaults = _rule(data.get("defaults") or {}, KeyRule(), f"{where}: defaults")
    return {str(k): _rule(v or {}, defaults, f"{where}: keys.{k}") for k, v in (data.get("keys") or {}).items()}


def _rule(spec: Any, base: KeyRule, where: str) -> KeyRule:
    if not isinstance(spec, dict) or set(spec) - {"requests_per_minute", "concurrent_jobs", "models"}:
        raise ValueError(f"{where}: expected a mapping of requests_per_minute, concurrent_jobs, models")
    for name in ("requests_per_minute", "concurrent_jobs"):
        if name in spec and (not isinstance(spec[name], int) or isinstance(spec[name], bool) or spec[name] < 0):
            raise ValueError(f"{where}.{name}: expected a whole number >= 0, got {spec[name]!r}")
    models = spec.get("models", list(base.models))
    if not isinstance(models, list) or not all(isinstance(m, str) for m in models):
        raise ValueError(f"{where}.models: expected a list of catalog names")
    return KeyRule(spec.get("requests_per_minute", base.requests_per_minute),
                   spec.get("concurrent_jobs", base.concurrent_jobs), tuple(models))


def read_keys_file(path: str) -> dict[str, KeyRule]:
    with open(path, encoding="utf-8") as f:
        return parse_keys(f.read(), path)


class KeyLimits:
    """The keys a gateway accepts: fixed ones (`$RENDERFLEET_API_KEYS`, ServeConfig.api_keys) plus the file's,
    re-read at most once a second when its modification time changes. With `app_name` (a gateway replica) and
    a keys file (the only place limits come from), rates are counted in the app's shared window."""

    def __init__(self, fixed: tuple[str, ...], path: str | None, check_every_s: float = 1.0,
                 app_name: str | None = None):
        self.path, self.check_every_s = path, check_every_s
        self._fixed = {k: KeyRule() for k in fixed}
        self._rules: dict[str, KeyRule] = dict(self._fixed)
        self._stamp: tuple[float, int] | None = None
        self._checked = float("-inf")
        self._reload()
        self._windows = SharedWindows(app_name if path else None)

    def _reload(self) -> None:
        now = time.monotonic()
        if not self.path or now - self._checked < self.check_every_s:
            return
        self._checked = now
        try:
            st = os.stat(self.path)
            stamp = (st.st_mtime, st.st_size)
            if stamp != self._stamp:
                self._rules = {**self._fixed, **read_keys_file(self.path)}
                self._stamp = stamp
        except (OSError, ValueError) as e:  # keep the last good keys; a broken edit must not open the server
            import logging

            logging.getLogger(__name__).error("api keys file not (re)loaded, keeping the previous keys: %s", e)

    def enabled(self) -> bool:
        self._reload()
        return bool(self._rules) or bool(self.path)

    def keys(self) -> list[str]:
        self._reload()
        return list(self._rules)

    def rule(self, key: str) -> KeyRule:
        self._reload()
        return self._rules.get(key, KeyRule())

    def allows(self, key: str, model: str) -> bool:
        models = self.rule(key).models
        return not models or model in models

    async def admit(self, key: str, metrics: dict[str, Any] | None = None) -> None:
        """Counts one request against the key's minute window (shared by the app's replicas); 429 with
        Retry-After when it is full."""
        limit = self.rule(key).requests_per_minute
        if not limit:
            return
        retry = await self._windows.admit(key, limit)
        if retry:
            if metrics:
                metrics["refused"].labels("429", "rate_limited").inc()
            raise APIError(429, f"rate limit reached: {limit} requests per minute for this API key; retry in {retry} s",
                           type_="rate_limit_error", code="rate_limited", headers={"Retry-After": str(retry)})

    def check_jobs(self, key: str, active: int, metrics: dict[str, Any] | None = None) -> None:
        """429 when the key already has its concurrent jobs queued or in progress."""
        limit = self.rule(key).concurrent_jobs
        if limit and active >= limit:
            if metrics:
                metrics["refused"].labels("429", "rate_limited").inc()
            raise APIError(429, f"concurrent job limit reached: {limit} queued or in progress for this API key",
                           type_="rate_limit_error", code="rate_limited", headers={"Retry-After": "5"})
