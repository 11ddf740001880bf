"""Helpers for the online-endpoint tests: free ports, small serve catalogs, store file counts, latency summaries."""

from __future__ import annotations

import socket
import time
from pathlib import Path
from typing import Any

import yaml


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_catalog(tiny_catalog: str, folder: Path, serve: dict[str, dict[str, Any]], default: str = "tiny-sd",
                  policy_terms: tuple[str, ...] = ("forbidden",)) -> str:
    """A catalog of the named tiny pipelines (plus the safety checker), each with the given `serve` settings."""
    base = Path(tiny_catalog).parent
    data = yaml.safe_load(Path(tiny_catalog).read_text())
    models = {}
    for name in [*serve, "tiny-safety-checker"]:
        entry = dict(data["models"][name], source=str(base / data["models"][name]["source"]))
        if entry["kind"] == "pipeline":
            entry["serve"] = serve[name]
        models[name] = entry
    (folder / "policy.yaml").write_text(yaml.safe_dump({"terms": list(policy_terms)}))
    safety = {**data.get("safety", {}), "prompt_policy": str(folder / "policy.yaml")}
    path = folder / "serve-catalog.yaml"
    path.write_text(yaml.safe_dump({"default_model": default, "safety": safety, "models": models}, sort_keys=False))
    return str(path)


def stored_outputs(store: Path) -> set[str]:
    """Every rendered output in a local store (uploads are not outputs; a write's hidden temporary is not one yet)."""
    if not store.exists():
        return set()
    return {str(p) for p in store.rglob("*")
            if p.is_file() and not p.name.startswith(".") and "uploads" not in p.relative_to(store).parts}


def settled_outputs(store: Path, timeout: float = 20.0) -> set[str]:
    """The store's outputs once no write is in flight: b64_json answers are stored after they are sent, so an
    earlier request's output may still be landing. Settled: no temporaries, and the same listing 0.5 s apart."""
    deadline = time.monotonic() + timeout
    last = None
    while True:
        busy = store.exists() and any(p.name.startswith(".") and p.name.endswith(".tmp") for p in store.rglob("*"))
        now = stored_outputs(store)
        if not busy and now == last:
            return now
        assert time.monotonic() < deadline, "the store never settled"
        last = None if busy else now
        time.sleep(0.5)


def wait_for(predicate, timeout: float, what: str, every: float = 0.5) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, what
        time.sleep(every)


def percentiles(values: list[float]) -> str:
    """'p50 … p95 … max …' in milliseconds, for printing (never asserted: timings depend on the machine)."""
    if not values:
        return "none"
    ordered = sorted(values)

    def at(q: float) -> float:
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000

    return f"p50 {at(0.50):.0f} ms, p95 {at(0.95):.0f} ms, max {ordered[-1] * 1000:.0f} ms"


def assert_openai_error(body: Any, status: int) -> dict:
    """The body is OpenAI's error shape; returns its `error` object."""
    assert isinstance(body, dict) and set(body) == {"error"}, f"{status}: {body!r}"
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}, f"{status}: {body!r}"
    assert isinstance(error["message"], str) and error["message"], f"{status}: {body!r}"
    assert error["type"] in ("invalid_request_error", "authentication_error", "server_error"), f"{status}: {body!r}"
    assert error["param"] is None or isinstance(error["param"], str), f"{status}: {body!r}"
    assert error["code"] is None or isinstance(error["code"], str), f"{status}: {body!r}"
    assert (error["type"] == "server_error") == (status >= 500), f"{status}: {body!r}"
    return error
