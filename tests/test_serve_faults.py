"""Fault cases for the online endpoint: a model replica killed (SIGKILL) while requests are in flight."""

from __future__ import annotations

import os
import signal
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait

import httpx
import pytest

from serve_helpers import assert_openai_error, serve_catalog, wait_for

pytestmark = pytest.mark.timeout(300)

APP, DEPLOYMENT = "rf-faults", "model-tiny-sd"


@pytest.fixture(scope="module")
def endpoint(tmp_path_factory, tiny_catalog, serve_http) -> str:
    from ray import serve

    from cluster.serve_app import ServeConfig, build_app

    folder = tmp_path_factory.mktemp("serve-faults")
    catalog = serve_catalog(tiny_catalog, folder, {"tiny-sd": {
        "min_replicas": 1, "max_replicas": 1, "max_batch_size": 2, "batch_wait_timeout_s": 0.05,
        "max_ongoing_requests": 8, "max_queued_requests": 64}})
    serve.run(build_app(ServeConfig(catalog_path=catalog, store=str(folder / "store"), public_url=serve_http)),
              name=APP, route_prefix="/")
    return serve_http


def replica_pids() -> list[int]:
    """The live model replicas' process ids, from the GCS actor table (the state API needs the dashboard, which
    the test cluster does not run)."""
    from ray._private import state

    prefix = f"SERVE_REPLICA::{APP}#{DEPLOYMENT}#"
    return [a["Pid"] for a in state.actors().values() if a["State"] == "ALIVE" and (a.get("Name") or "").startswith(prefix)]


def generate(base: str, i: int, size: str = "256x256") -> httpx.Response:
    return httpx.post(base + "/v1/images/generations", timeout=60,  # bounded: a hung socket fails the test
                      json={"prompt": f"fault {i}", "size": size, "num_inference_steps": 4, "n": 1 + i % 2})


def test_replica_killed_mid_burst_gives_503s_or_results_then_recovers(endpoint):
    assert generate(endpoint, 0, "64x64").status_code == 200
    [pid] = replica_pids()
    with ThreadPoolExecutor(16) as pool:
        futures = [pool.submit(generate, endpoint, i) for i in range(16)]
        wait(futures, timeout=120, return_when=FIRST_COMPLETED)  # the replica is busy: kill it mid-burst
        os.kill(pid, signal.SIGKILL)
        killed_at = time.monotonic()
        answers = [f.result() for f in futures]  # httpx.TimeoutException here means a caller hung
    statuses = [r.status_code for r in answers]
    print(f"\nreplica {pid} killed mid-burst: statuses {sorted(statuses)}")
    assert set(statuses) <= {200, 503}, [r.text for r in answers if r.status_code not in (200, 503)]
    unavailable = 0
    for r in answers:
        if r.status_code == 503:
            assert r.headers.get("retry-after") == "1", r.headers
            code = assert_openai_error(r.json(), 503)["code"]
            assert code in ("model_unavailable", "overloaded"), r.text
            unavailable += code == "model_unavailable"
    assert unavailable, "no request was in flight on the killed replica"

    def recovered() -> bool:
        r = generate(endpoint, 1, "64x64")
        assert r.status_code in (200, 503), r.text
        return r.status_code == 200

    wait_for(recovered, 120, "the endpoint never answered 200 after the replica was killed", every=1.0)
    print(f"recovered {time.monotonic() - killed_at:.1f} s after the kill; replicas now {replica_pids()}")
    assert pid not in replica_pids()
