"""Runs renderfleet jobs on a real multi-node Ray cluster on this machine (`cluster_utils`, 127.0.0.1) and prints
one JSON line per job of what happened. Tests run it in a subprocess: one Ray cluster per process, shared by the
cases given (a cluster start is the slow part), a removed node replaced by a fresh one between cases."""

from __future__ import annotations

import argparse
import io
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_DATA_EXECUTION_NO_PROGRESS_TIMEOUT_S", "120")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import pyarrow.parquet as pq  # noqa: E402
import ray  # noqa: E402
from ray.cluster_utils import Cluster  # noqa: E402

from jobs.render import RenderJob, run  # noqa: E402
from storage.results import log_dir, read_results  # noqa: E402
from storage.fs import list_files  # noqa: E402

STORE = 120 * 1024 * 1024


def start(cpus_per_node: list[int], homes: list[str]) -> tuple[Cluster, list]:
    """A head without CPUs (the driver's node) and one worker node per entry, each with its own RENDERFLEET_HOME."""
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "object_store_memory": STORE,
                                                            "include_dashboard": False})
    nodes = [cluster.add_node(num_cpus=c, object_store_memory=STORE, env_vars={"RENDERFLEET_HOME": h})
             for c, h in zip(cpus_per_node, homes)]
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)
    return cluster, nodes


def ok_rows(out: str) -> int:
    return sum(pq.read_table(u, columns=["status"])["status"].to_pylist().count("ok")
               for u in list_files(log_dir(out), suffix=".parquet"))


def main(argv: list[str]) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--catalog", required=True)
    p.add_argument("--nodes", default="1,1", help="CPUs of each worker node")
    p.add_argument("--case", action="append", required=True, type=json.loads,
                   help='one job, as JSON: {"manifest", "out", "workers": 2, "remove_after": 0, "kill_driver_after": 0}; '
                        "cases run one after another on the same cluster, a removed node replaced in between")
    args = p.parse_args(argv)
    cpus = [int(c) for c in args.nodes.split(",")]
    homes = [tempfile.mkdtemp(prefix=f"rf-node{i}-") for i in range(len(cpus))]
    cluster, nodes = start(cpus, homes)
    try:
        for number, spec in enumerate(args.case):
            case = Case(catalog=args.catalog, **spec)
            figures: dict = {"case": number, "nodes": len(nodes), "homes": homes}
            try:
                figures.update(cli_runs(cluster, nodes, case) if case.kill_driver_after else job_run(cluster, nodes, case))
                _finish(case, figures, homes)
            except BaseException as e:  # noqa: BLE001 - the next case still runs; the test reports this one
                print("FIGURES " + json.dumps({**figures, "error": repr(e)}), flush=True)
            if len(nodes) < len(cpus):  # the case removed the last node: a fresh one (own cache) for the next case
                homes[len(nodes)] = tempfile.mkdtemp(prefix=f"rf-node{len(nodes)}-")
                nodes.append(cluster.add_node(num_cpus=cpus[len(nodes)], object_store_memory=STORE,
                                              env_vars={"RENDERFLEET_HOME": homes[len(nodes)]}))
                cluster.wait_for_nodes()
    finally:
        ray.shutdown()
        cluster.shutdown()


@dataclass
class Case:
    catalog: str
    manifest: str
    out: str
    workers: int = 2
    remove_after: int = 0  # remove the last worker node after this many ok rows
    kill_driver_after: int = 0  # run the job as a CLI driver, SIGKILL it after this many ok rows, then rerun it


def job_run(cluster: Cluster, nodes: list, case: Case) -> dict:
    """The job through the Python API in a thread of this driver; the last node removed after `remove_after` rows."""
    job = RenderJob(manifest=case.manifest, out=case.out, catalog=case.catalog, workers=case.workers,
                    batch_size=1, results_flush_rows=1, results_flush_s=0.2, torch_threads=1)
    result: dict = {}
    figures: dict = {}
    stream = io.StringIO()

    def render() -> None:
        try:
            result["report"] = run(job, stream=stream)
        except BaseException as e:  # noqa: BLE001 - reported below
            result["error"] = repr(e)

    started = time.monotonic()
    thread = threading.Thread(target=render, daemon=True)
    thread.start()
    if case.remove_after:
        while thread.is_alive() and ok_rows(case.out) < case.remove_after:
            time.sleep(0.2)
        figures["removed_after_ok"] = ok_rows(case.out)
        cluster.remove_node(nodes.pop(), allow_graceful=False)
        figures["removed_at_s"] = time.monotonic() - started
    thread.join(timeout=600)
    figures["elapsed_s"] = time.monotonic() - started
    figures["plan"] = [line for line in stream.getvalue().splitlines() if "rendering" in line]
    if "error" in result or thread.is_alive():
        figures["error"] = result.get("error", "timed out")
    else:
        report = result["report"]
        figures.update(counts=report.counts, total=report.total, rerendered=report.rerendered)
    return figures


def _finish(case: Case, figures: dict, homes: list[str]) -> None:
    table = read_results(case.out)
    figures["ids"] = table["id"].to_pylist()
    figures["status"] = dict(zip(table["id"].to_pylist(), table["status"].to_pylist()))
    figures["workers"] = sorted(set(table["worker"].to_pylist()))
    figures["fetches"] = [_lines(os.path.join(h, "models", "fetches.jsonl")) for h in homes]
    print("FIGURES " + json.dumps(figures), flush=True)


def cli_runs(cluster: Cluster, nodes: list, case: Case) -> dict:
    """The job as `renderfleet render` against the cluster: a node removed, the driver SIGKILLed, then rerun."""
    cmd = [sys.executable, "-m", "jobs.cli", "render", case.manifest, "--out", case.out, "--catalog", case.catalog,
           "--workers", str(case.workers), "--batch-size", "1", "--results-flush-rows", "1",
           "--results-flush-seconds", "0.2", "--torch-threads", "1", "--address", cluster.address]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    figures: dict = {}
    started = time.monotonic()
    first = subprocess.Popen(cmd, cwd=root, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             start_new_session=True)
    try:
        while first.poll() is None and ok_rows(case.out) < case.remove_after:
            time.sleep(0.2)
        if case.remove_after:
            figures["removed_after_ok"] = ok_rows(case.out)
            cluster.remove_node(nodes.pop(), allow_graceful=False)
        while first.poll() is None and ok_rows(case.out) < case.kill_driver_after:
            time.sleep(0.2)
        figures["killed_after_ok"] = ok_rows(case.out)
        figures["first_exit"] = first.poll()
        os.killpg(first.pid, signal.SIGKILL)
    finally:
        first.wait()
    rerun = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=400)
    figures.update(rerun_exit=rerun.returncode, elapsed_s=time.monotonic() - started,
                   summary=[line for line in rerun.stdout.splitlines() + rerun.stderr.splitlines()
                            if line.startswith(("rows:", "rendered again:"))])
    return figures


def _lines(path: str) -> int:
    try:
        with open(path) as f:
            return sum(1 for _ in f)
    except FileNotFoundError:
        return 0


if __name__ == "__main__":
    main(sys.argv[1:])
