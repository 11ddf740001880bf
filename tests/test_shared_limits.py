"""Issue 14, fair use: a key's requests per minute hold across all gateway replicas of an app (one shared window
per app, `cluster/key_window.py`), on a real Serve app on 127.0.0.1 with two gateway replicas; the window logic
and the fallback when the shared window cannot answer, without Ray."""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import yaml

from serve_helpers import serve_catalog, wait_for

APP, RATED, MANY = "rf-shared-limits", "sk-rated", "sk-many"
RATE, EXTRA = 4, 8  # a burst of 12 at once: Serve's router spreads it over both replicas
SD = {"min_replicas": 1, "max_replicas": 1, "max_batch_size": 4, "batch_wait_timeout_s": 0.05}


# -- the window logic ---------------------------------------------------------------------------------------------

class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.mark.timeout(30)
def test_a_minute_window_admits_its_limit_and_says_when_the_next_fits():
    from cluster.key_window import MinuteWindows

    clock = Clock()
    w = MinuteWindows(clock=clock)
    assert [w.admit("k", 3) for _ in range(3)] == [0, 0, 0]
    clock.now += 10.2
    assert w.admit("k", 3) == 50  # the first one leaves the window 49.8 s from now: whole seconds, rounded up
    assert w.admit("other", 3) == 0  # keys are counted apart
    clock.now += 49.8  # t = 60: the first three have left
    assert [w.admit("k", 3) for _ in range(4)] == [0, 0, 0, 60]
    assert w.admit("k", 5) == 0  # a raised limit applies at once: the window holds counts only
    clock.now += 61
    assert w.admit("k", 1) == 0 and w.admit("k", 1) == 60


@pytest.mark.timeout(30)
def test_a_lowered_limit_waits_for_enough_requests_to_leave():
    from cluster.key_window import MinuteWindows

    clock = Clock()
    w = MinuteWindows(clock=clock)
    for _ in range(4):  # at t = 0, 10, 20, 30
        assert w.admit("k", 4) == 0
        clock.now += 10
    # now t = 40 with 4 in the window; at limit 2 the 3rd oldest (t = 20) must leave: at t = 80
    assert w.admit("k", 2) == 40


@pytest.mark.timeout(30)
def test_idle_keys_are_forgotten():
    from cluster.key_window import MinuteWindows

    clock = Clock()
    w = MinuteWindows(clock=clock)
    for i in range(100):
        w.admit(f"k{i}", 1)
    clock.now += 61
    w.admit("fresh", 1)
    assert list(w._windows) == ["fresh"]


class FakeActor:
    """Stands in for the shared window's actor handle: answers, or never does."""

    def __init__(self, answer: int | None):
        self.answer, self.calls = answer, 0
        self.admit = self

    def remote(self, key: str, limit: int):
        self.calls += 1
        return asyncio.sleep(3600 if self.answer is None else 0, result=self.answer)


@pytest.mark.timeout(30)
def test_without_an_answer_in_time_the_replica_counts_alone_from_what_it_admitted(caplog):
    from cluster.key_window import SharedWindows

    async def scenario() -> list[int]:
        w = SharedWindows(None, timeout_s=0.2)
        w.app_name, w._connect_soon = "test-app", lambda: None  # no Ray: the actor is a fake
        w._actor = FakeActor(0)
        answers = [await w.admit("k", 3), await w.admit("k", 3)]  # admitted by the shared window, noted here
        w._actor = stuck = FakeActor(None)
        started = time.monotonic()
        answers.append(await w.admit("k", 3))  # the actor does not answer: the local window, after timeout_s
        assert time.monotonic() - started < 1.0 and stuck.calls == 1
        answers += [await w.admit("k", 3), await w.admit("k", 3)]  # full here; the lost actor is not asked again
        assert stuck.calls == 1
        return answers

    answers = asyncio.run(scenario())
    assert answers[:3] == [0, 0, 0] and answers[3] > 0 and answers[4] > 0
    assert sum("counted per gateway replica" in r.getMessage() for r in caplog.records) == 1  # logged once


@pytest.mark.timeout(30)
def test_without_ray_the_window_is_the_replicas_own():
    from cluster.key_window import SharedWindows

    async def scenario() -> list[int]:
        w = SharedWindows(None)
        return [await w.admit("k", 2) for _ in range(3)]

    assert asyncio.run(scenario())[:2] == [0, 0]


# -- two gateway replicas, one window -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def two_gateways(tmp_path_factory, tiny_catalog, serve_http):
    from ray import serve

    from cluster.serve_app import ServeConfig, build_app

    folder = tmp_path_factory.mktemp("shared-limits")
    catalog = serve_catalog(tiny_catalog, folder, {"tiny-sd": SD})
    keys = folder / "keys.yaml"
    keys.write_text(yaml.safe_dump({"keys": {RATED: {"requests_per_minute": RATE}, MANY: {"requests_per_minute": 1000}}}))
    config = ServeConfig(catalog_path=catalog, store=str(folder / "store"), public_url=serve_http + "/l",
                         api_keys_file=str(keys), gateway_replicas=2)
    started = time.monotonic()
    serve.run(build_app(config, ["tiny-sd"]), name=APP, route_prefix="/l")
    print(f"\napp with 2 gateway replicas ready in {time.monotonic() - started:.1f} s")
    yield serve_http + "/l", keys
    serve.delete(APP)


def _burst(base: str, key: str, n: int, tag: str) -> list[httpx.Response]:
    """n simultaneous generations for `key` (simultaneous, so Serve's router spreads them over the replicas)."""
    def one(i: int) -> httpx.Response:
        return httpx.post(base + "/v1/images/generations", headers={"Authorization": f"Bearer {key}"}, timeout=60,
                          json={"model": "tiny-sd", "prompt": f"{tag} {i}", "size": "64x64", "num_inference_steps": 1})

    with ThreadPoolExecutor(n) as pool:
        return list(pool.map(one, range(n)))


def _check_refusals(responses: list[httpx.Response]) -> None:
    for r in responses:
        assert r.status_code in (200, 429), r.text
        if r.status_code == 429:
            error = r.json()["error"]
            assert (error["code"], error["type"]) == ("rate_limited", "rate_limit_error"), r.text
            assert 1 <= int(r.headers["retry-after"]) <= 60 and "requests per minute" in error["message"]


@pytest.mark.timeout(120)
def test_a_keys_rate_holds_across_two_gateway_replicas(two_gateways):
    base, keys = two_gateways
    seen: set[str] = set()  # Serve's proxy learns of new replicas a moment after serve.run returns

    def both_answer() -> bool:
        seen.add(httpx.get(base + "/healthz", timeout=10).headers.get("x-renderfleet-replica", ""))
        return len(seen - {""}) == 2

    wait_for(both_answer, 30, f"healthz never reached two gateway replicas: {seen}", every=0.1)
    started = time.monotonic()
    responses = _burst(base, RATED, RATE + EXTRA, "shared")
    _check_refusals(responses)
    codes = sorted(r.status_code for r in responses)
    replicas = {r.headers.get("x-renderfleet-replica") for r in responses}
    print(f"burst of {RATE + EXTRA}: {codes} from replicas {sorted(map(str, replicas))} "
          f"in {time.monotonic() - started:.1f} s")
    assert None not in replicas and len(replicas) == 2, "the burst did not reach both gateway replicas"
    assert codes == [200] * RATE + [429] * EXTRA  # per-replica windows would have admitted up to 2 * RATE

    keys.write_text(yaml.safe_dump({"keys": {RATED: {"requests_per_minute": RATE + 2}, MANY: {}}}))
    time.sleep(1.5)  # each replica re-reads the file at most once a second
    responses = _burst(base, RATED, 4, "raised")
    _check_refusals(responses)
    assert sorted(r.status_code for r in responses) == [200, 200, 429, 429]  # the new limit, the same counts


@pytest.mark.timeout(120)
def test_an_unreachable_shared_window_never_holds_a_request_and_comes_back(two_gateways):
    import ray

    from cluster.key_window import NAMESPACE, actor_name

    base, keys = two_gateways
    keys.write_text(yaml.safe_dump({"keys": {RATED: {"requests_per_minute": RATE}, MANY: {"requests_per_minute": 1000}}}))
    time.sleep(1.5)
    first = ray.get_actor(actor_name(APP), namespace=NAMESPACE)
    ray.kill(first, no_restart=True)
    started = time.monotonic()
    responses = _burst(base, MANY, 4, "fallback")
    took = time.monotonic() - started
    print(f"4 requests with the shared window killed: {[r.status_code for r in responses]} in {took:.1f} s")
    assert [r.status_code for r in responses] == [200] * 4  # counted per replica meanwhile, not refused, not hung

    def replaced() -> bool:
        _burst(base, MANY, 2, "reconnect")  # replicas reconnect when a request finds the window gone
        try:
            return ray.get_actor(actor_name(APP), namespace=NAMESPACE)._actor_id != first._actor_id
        except ValueError:
            return False

    wait_for(replaced, 40, "no replica re-created the shared window", every=1.0)
