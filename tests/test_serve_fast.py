"""The fast online path: b64_json answered from the replica's memory, and batch windows only when rows have company.

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


def test_b64_json_is_the_stored_output_without_a_read_back(fast):
    base, store, _ = fast
    r = generate(base, "a stored lighthouse")
    assert r.status_code == 200, r.text
    data = base64.b64decode(r.json()["data"][0]["b64_json"])
    stored = {hashlib.sha256(Path(p).read_bytes()).hexdigest() for p in stored_outputs(store)}
    assert hashlib.sha256(data).hexdigest() in stored  # still stored, byte for byte


def test_the_gateway_answers_b64_from_the_result_not_the_store():
    """The b64 answer is built from the bytes the replica handed back: an output that is not (any longer) in the
    store still answers, so the request path never reads the store."""
    from cluster.serve_app import Gateway

    item = Gateway.func_or_class._item(None, {"output_uri": "/nonexistent/store/x.png", "data": b"\x89PNG bytes"},
                                       "b64_json", "p")
    assert base64.b64decode(item["b64_json"]) == b"\x89PNG bytes" and item["revised_prompt"] == "p"
