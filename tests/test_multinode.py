"""Multi-node runs on a real `cluster_utils` cluster on 127.0.0.1: 1-CPU nodes, and losing a node mid-job.
Cases run in tests/multinode_kit.py processes (one Ray cluster per process, shared by the cases given to it)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from storage.results import absolute_uri, read_results

pytestmark = pytest.mark.timeout(1000)  # the first test also runs the shared cluster's three jobs
KIT = os.path.join(os.path.dirname(__file__), "multinode_kit.py")


def _manifest(path: str, rows: int, size: int, steps: int) -> str:
    pq.write_table(pa.table({"id": [f"row.{i:04d}" for i in range(rows)], "prompt": [f"a cube {i}" for i in range(rows)],
                             "model": ["tiny-sd"] * rows, "width": [size] * rows, "height": [size] * rows,
                             "num_inference_steps": [steps] * rows}), path)
    return path


def _kit(*args: str) -> list[dict]:
    """Runs the kit's cases on one cluster; the figures of each case, in order."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")}
    proc = subprocess.run([sys.executable, KIT, *args], capture_output=True, text=True, timeout=900, env=env,
                          start_new_session=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("FIGURES ")]
    assert lines, f"kit failed (rc={proc.returncode}):\n{proc.stderr[-4000:]}"
    return [json.loads(line[len("FIGURES "):]) for line in lines]


def _case(manifest: str, out: str, **options: int) -> str:
    return json.dumps({"manifest": manifest, "out": out, **options})


ONE_CPU_ROWS, LOSS_ROWS, DRIVER_ROWS = 60, 60, 50  # the undisturbed job is the node-loss job's yardstick


@pytest.fixture(scope="module")
def one_cpu_nodes(tmp_path_factory, tiny_catalog) -> dict[str, tuple[dict, str]]:
    """Three jobs on one cluster of two 1-CPU nodes: undisturbed, a node lost, a node and the driver lost.
    Sharing the cluster saves two cluster starts; the kit replaces the removed node between cases."""
    root = tmp_path_factory.mktemp("multinode")
    jobs = {"plain": (ONE_CPU_ROWS, {}), "node_loss": (LOSS_ROWS, {"remove_after": 10}),
            "driver_loss": (DRIVER_ROWS, {"remove_after": 8, "kill_driver_after": 16})}
    cases, outs = [], {}
    for name, (rows, options) in jobs.items():
        outs[name] = str(root / name / "out")
        os.makedirs(root / name)
        cases += ["--case", _case(_manifest(str(root / name / "m.parquet"), rows, 64, 2), outs[name], **options)]
    ran = {f["case"]: f for f in _kit("--catalog", tiny_catalog, "--nodes", "1,1", *cases)}
    return {name: (ran.get(i, {"error": "the kit ended before this case"}), outs[name]) for i, name in enumerate(jobs)}


def _exactly_once_and_whole(out: str, ids: list[str]) -> None:
    table = read_results(out)
    assert sorted(table["id"].to_pylist()) == sorted(ids)
    assert set(table["status"].to_pylist()) == {"ok"}
    for uri in table["output_uri"].to_pylist():  # every output is a whole PNG (written under a temporary name)
        with open(absolute_uri(out, uri), "rb") as f:
            data = f.read()
        assert data.startswith(b"\x89PNG") and data.endswith(b"IEND\xaeB`\x82")
    leftovers = [n for _, _, names in os.walk(out) for n in names if n.endswith(".tmp")]
    assert not leftovers


def test_nodes_of_one_cpu_each_run_the_job(one_cpu_nodes):
    """The plan sizes actors per node: 0.75 CPU each on 1-CPU nodes, leaving room for the read tasks."""
    figures, out = one_cpu_nodes["plain"]
    print("undisturbed:", {k: v for k, v in figures.items() if k not in ("ids", "status")})
    assert "error" not in figures, figures.get("error")
    assert figures["counts"] == {"ok": ONE_CPU_ROWS}
    assert "on 2 workers (cpu=0.75" in figures["plan"][0]
    _exactly_once_and_whole(out, [f"row.{i:04d}" for i in range(ONE_CPU_ROWS)])


def test_weights_are_fetched_once_per_node(tmp_path, tiny_catalog, s3_server):
    """Two nodes, two actors each, the model on S3: each node's cache (its own RENDERFLEET_HOME) fetches it once."""
    import yaml

    prefix = s3_server.create_bucket("multinode-models")  # s3://multinode-models
    bucket = prefix.removeprefix("s3://")
    client = s3_server.client()
    source = os.path.join(os.path.dirname(tiny_catalog), "tiny-sd")
    for root, _, names in os.walk(source):
        for name in names:
            key = "tiny-sd/" + os.path.relpath(os.path.join(root, name), source)
            client.upload_file(os.path.join(root, name), bucket, key)
    catalog = yaml.safe_load(open(tiny_catalog))
    catalog["models"]["tiny-sd"]["source"] = f"{prefix}/tiny-sd"
    # Beside the tiny catalog, so the other entries' relative sources still resolve.
    catalog_path = Path(tiny_catalog).with_name(f"catalog-s3-{tmp_path.name}.yaml")
    catalog_path.write_text(yaml.safe_dump(catalog))
    manifest = _manifest(str(tmp_path / "m.parquet"), 40, 128, 4)
    [figures] = _kit("--catalog", str(catalog_path), "--nodes", "2,2",
                     "--case", _case(manifest, str(tmp_path / "out"), workers=4))
    print("node caches:", {k: figures.get(k) for k in ("plan", "workers", "fetches", "elapsed_s")})
    assert "error" not in figures, figures.get("error")
    assert figures["counts"] == {"ok": 40} and "on 4 workers" in figures["plan"][0]
    assert figures["fetches"] == [1, 1]  # one download per node, shared by its two actors


def test_losing_a_node_mid_job_loses_no_row(one_cpu_nodes):
    figures, out = one_cpu_nodes["node_loss"]
    print("node loss:", {k: v for k, v in figures.items() if k not in ("ids", "status")})
    print(f"time to finish: {figures.get('elapsed_s', 0):.1f} s with a node lost after {figures.get('removed_after_ok')} "
          f"rows vs {one_cpu_nodes['plain'][0].get('elapsed_s', 0):.1f} s undisturbed, same rows and cluster")
    assert "error" not in figures, figures.get("error")
    assert figures["removed_after_ok"] < LOSS_ROWS  # the node went while rows were still rendering
    assert figures["counts"]["ok"] == LOSS_ROWS
    _exactly_once_and_whole(out, [f"row.{i:04d}" for i in range(LOSS_ROWS)])


def test_losing_a_node_and_the_driver_then_rerunning(one_cpu_nodes):
    """The node goes, then the driver is SIGKILLed; the same command run again finishes every row once."""
    figures, out = one_cpu_nodes["driver_loss"]
    print("node and driver loss:", {k: v for k, v in figures.items() if k not in ("ids", "status")})
    assert "error" not in figures, figures.get("error")
    assert figures["first_exit"] is None and figures["killed_after_ok"] < DRIVER_ROWS  # killed while rendering
    assert figures["rerun_exit"] == 0, figures
    _exactly_once_and_whole(out, [f"row.{i:04d}" for i in range(DRIVER_ROWS)])
    assert any(line.startswith(f"rows: {DRIVER_ROWS} in manifest") for line in figures["summary"])
