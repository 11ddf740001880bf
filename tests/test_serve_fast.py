"""The fast online path: b64_json answered from the replica's memory and stored after the answer, and batch
windows only when rows have company.

A real Serve app on 127.0.0.1 whose batch window is far longer than a render, so a lone request that
waited for it would show; the assertions use the replica's own counters, never the clock.
"""

from __future__ import annotations

import base64
import hashlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from serve_helpers import serve_catalog, stored_outputs, wait_for

pytestmark = pytest.mark.timeout(600)

WINDOW_S = 5.0  # the configured batch wait: a lone request must never pay it; rows with company may


@pytest.fixture(scope="module")
def fast(tmp_path_factory, tiny_catalog, serve_http):
    from ray import serve

    from cluster.serve_app import ServeConfig, build_app

    folder = tmp_path_factory.mktemp("serve-fast")
    catalog = serve_catalog(tiny_catalog, folder, {"tiny-sd": {
        "min_replicas": 1, "max_replicas": 1, "max_batch_size": 4, "batch_wait_timeout_s": WINDOW_S,
        "max_ongoing_requests": 16, "max_queued_requests": 64}})
    config = ServeConfig(catalog_path=catalog, store=str(folder / "store"), public_url=serve_http)
    serve.run(build_app(config), name="fast", route_prefix="/")
    return serve_http, folder / "store", serve.get_deployment_handle("model-tiny-sd", app_name="fast")


def generate(base: str, prompt: str, fmt: str = "b64_json") -> httpx.Response:
    return httpx.post(base + "/v1/images/generations", timeout=120,
                      json={"model": "tiny-sd", "prompt": prompt, "size": "64x64", "num_inference_steps": 2,
                            "response_format": fmt})


def test_a_lone_request_opens_no_batch_window(fast):
    base, _, handle = fast
    wait_for(lambda: handle.stats.remote().result()["active"] == 0, 60, "rows still in flight")
    before = handle.stats.remote().result()
    for i in range(3):
        r = generate(base, f"alone {i}")
        assert r.status_code == 200, r.text
    after = handle.stats.remote().result()
    assert after["immediate"] == before["immediate"] + 3 and after["windowed"] == before["windowed"]


def test_rows_with_company_share_a_window(fast):
    base, _, handle = fast
    before = handle.stats.remote().result()
    with ThreadPoolExecutor(4) as pool:
        codes = [r.status_code for r in pool.map(lambda i: generate(base, f"together {i}"), range(4))]
    assert codes == [200] * 4
    after = handle.stats.remote().result()
    assert after["windowed"] > before["windowed"]  # the window opened only because others were queued
    assert after["peak_pending"] <= after["depth"]


def test_b64_json_is_stored_after_the_answer_byte_for_byte(fast):
    base, store, _ = fast
    r = generate(base, "a stored lighthouse")
    assert r.status_code == 200, r.text
    digest = hashlib.sha256(base64.b64decode(r.json()["data"][0]["b64_json"])).hexdigest()

    def stored() -> bool:
        return any(hashlib.sha256(Path(p).read_bytes()).hexdigest() == digest for p in stored_outputs(store))

    wait_for(stored, 30, "the b64_json output never reached the store")
    metrics = httpx.get(base + "/metrics", timeout=30).text
    assert 'renderfleet_output_writes_total{result="ok"}' in metrics


def test_b64_rows_are_finished_but_not_stored_by_the_replica(fast):
    """The replica hands the bytes back unwritten (the gateway stores them off the request path); a url row
    is stored before its answer, since the link must resolve."""
    _, _, handle = fast
    row = {"id": "unwritten-0", "prompt": "a harbour", "width": 64, "height": 64, "num_inference_steps": 2}
    theirs = handle.render.remote(row, True).result()
    assert theirs["status"] == "ok" and theirs["written"] is False and theirs["data"].startswith(b"\x89PNG")
    assert theirs["sha256"] == hashlib.sha256(theirs["data"]).hexdigest() and theirs["watermark"]
    assert not Path(theirs["output_uri"]).exists()
    ours = handle.render.remote(dict(row, id="written-0"), False).result()
    assert ours["status"] == "ok" and "written" not in ours and Path(ours["output_uri"]).is_file()


def test_background_writes_return_at_once_and_hold_back_past_their_bound(tmp_path):
    """submit() returns before the write runs; past the byte bound it waits for pending writes (back-pressure)."""
    import asyncio

    from prometheus_client import CollectorRegistry, Counter

    from cluster.output_writes import OutputWrites

    counter = Counter("writes", "w", ["result"], registry=CollectorRegistry())

    def result(name: str) -> dict:
        return {"status": "ok", "written": False, "output_uri": str(tmp_path / name), "data": b"x" * 1000,
                "content_type": "image/png"}

    async def scenario() -> tuple[bool, bool, bool, bool]:
        free = OutputWrites(counter, max_pending_bytes=10**6)
        await free.submit([result("a.png"), {"status": "failed"}, dict(result("stored.png"), written=True)])
        early = (tmp_path / "a.png").exists()
        await free.drain()
        bounded = OutputWrites(counter, max_pending_bytes=0)
        await bounded.submit([result("b.png")])
        return early, (tmp_path / "a.png").exists(), (tmp_path / "b.png").exists(), (tmp_path / "stored.png").exists()

    early, later, held_back, skipped = asyncio.run(scenario())
    assert (early, later, held_back, skipped) == (False, True, True, False)
    assert counter.labels("ok")._value.get() == 2


def test_the_gateway_answers_b64_from_the_result_not_the_store():
    """The b64 answer is built from the bytes the replica handed back: an output that is not (any longer) in the
    store still answers, so the request path never reads the store."""
    from cluster.serve_app import Gateway

    item = Gateway.func_or_class._item(None, {"output_uri": "/nonexistent/store/x.png", "data": b"\x89PNG bytes"},
                                       "b64_json", "p")
    assert base64.b64decode(item["b64_json"]) == b"\x89PNG bytes" and item["revised_prompt"] == "p"
