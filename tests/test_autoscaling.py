"""Growing and shrinking on a real autoscaling Ray cluster of fake nodes (tests/autoscale_kit.py): an elastic
pool (`--workers 1..3`) whose actors ask `accel: 1`, a resource only the autoscaler's nodes have; then the online
endpoint's replicas from zero to four and back (tests/autoscale_serve.py). Each case owns its cluster."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.timeout(420)
KIT = os.path.join(os.path.dirname(__file__), "autoscale_kit.py")


def _kit(*args: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")}
    proc = subprocess.run([sys.executable, KIT, *args], capture_output=True, text=True, timeout=400, env=env,
                          start_new_session=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("FIGURES ")]
    assert lines, f"kit failed (rc={proc.returncode}):\n{proc.stderr[-4000:]}"
    return json.loads(lines[-1][len("FIGURES "):])


def test_elastic_pool_grows_as_nodes_arrive_and_the_idle_nodes_go():
    rows = 80
    figures = _kit("--rows", str(rows), "--ms", "400", "--batch", "2", "--min-workers", "1", "--max-workers", "3",
                   "--idle-minutes", "0.1")
    batch = figures.get("batch", {})
    # (seconds, alive nodes, nodes with accel) at every change, and when the job started and ended.
    print("autoscaling trace:", figures.get("trace"), figures.get("marks"),
          {k: batch.get(k) for k in ("plan", "elapsed_s", "workers")})
    assert "error" not in figures, (figures["error"], figures.get("head_log"))
    assert batch["counts"] == {"ok": rows} and batch["ids"] == [f"as.{i:04d}" for i in range(rows)]
    assert "on 1..3 workers" in batch["plan"][0]
    trace = figures["trace"]
    assert trace[0][2] == 0  # no node had the resource before the job asked for it
    assert max(t[2] for t in trace) >= 2  # the pool grew past its minimum, and nodes were launched for it
    assert len(batch["workers"]) >= 2  # more than one actor rendered rows
    assert figures["released_after_s"] is not None and trace[-1][1:] == [1, 0]  # back to the head alone


def test_online_replicas_scale_up_under_load_and_back_to_zero_and_the_nodes_go():
    """The public app builder on the same kind of cluster: replicas of 1 CPU (two fit on the head), 0..4 of them."""
    figures = _kit("--serve-only", "--idle-minutes", "0.1", "--release-timeout", "90")
    serve = figures.get("serve", {})
    # (seconds, running replicas, alive nodes) at every change, and the cluster's own node trace.
    print("serve autoscaling:", serve.get("replicas_nodes"), serve.get("codes"), figures.get("trace"), figures.get("marks"))
    assert "error" not in figures, (figures["error"], figures.get("head_log"))
    assert serve["replicas_nodes"][0][1] == 0  # scaled from zero
    assert serve["peak_replicas"] >= 3 and serve["peak_nodes"] >= 2  # more replicas than the head holds: nodes came
    assert set(serve["codes"]) == {"200"}
    assert serve["zero_after_s"] is not None and serve["nodes_released"]  # back to zero, and to the head alone
