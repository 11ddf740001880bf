"""`renderfleet bench cluster`: one render job over a multi-node cluster, measured per node.

It reports per-node and total images/s, each render actor's busy time over the render window, rows retried,
and the cost per 1,000 assets at `--gpu-hour-price` (each render actor stands for one accelerator, billed for
the whole job). Without `--address` it starts a `cluster_utils` cluster on 127.0.0.1 (a head without CPUs for
the driver, `--nodes` worker nodes) in a child process group that is killed at the end; `--slowdown 1,2` gives
each node's stand-in renderer a different speed through the node's environment (pipelines/tiny/standin.py).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

from bench.common import BENCH_ENV, ROOT, apply_env, write_manifest
from bench.run import stop_group

STORE = 100 * 1024 * 1024
ACTOR_CLASS = "MapBatches(RenderActor)"  # Ray Data names the pool's actors MapWorker(MapBatches(RenderActor))


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--address", help="an existing Ray cluster to measure (default: start a local cluster_utils one)")
    p.add_argument("--nodes", type=int, default=3, help="worker nodes of the local cluster")
    p.add_argument("--node-cpus", type=int, default=1, help="CPUs of each local worker node")
    p.add_argument("--slowdown", default="", metavar="F,F,...",
                   help="the stand-in's sleep factor on each local node, e.g. 1,2 (default: 1 on every node)")
    p.add_argument("--workers", default="", metavar="N|MIN..MAX", help="render actors (default: one per node)")
    p.add_argument("--rows", type=int, default=300, help="rows of the manifest")
    p.add_argument("--ms-per-image", type=float, default=200.0, help="the stand-in renderer's sleep per image")
    p.add_argument("--batch-size", type=int, default=2, help="rows per actor call")
    p.add_argument("--gpu-hour-price", type=float, default=2.0, help="price of one accelerator-hour, for the cost figure")
    p.add_argument("--out", default="renderfleet-bench-cluster", help="folder for bench-cluster.json and the job's outputs")


def main(argv: list[str] | None = None) -> int:
    """Parses the options; a local cluster is measured in a child process group, killed whatever happens."""
    from jobs.cli import DefaultsFormatter

    p = argparse.ArgumentParser(prog="renderfleet bench cluster", description=__doc__, formatter_class=DefaultsFormatter)
    add_arguments(p)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    if args.address or args.child:
        figures = measure(args, out)
        (out / "bench-cluster.json").write_text(json.dumps(figures, indent=1))
        print("\n".join(lines(figures)), flush=True)
        return 1 if figures.get("error") else 0
    cmd = [sys.executable, "-m", "bench.cluster", *(argv if argv is not None else sys.argv[1:]), "--child"]
    env = {**os.environ, **BENCH_ENV, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, start_new_session=True)
    try:
        return proc.wait()
    finally:
        stop_group(proc)


def factors(text: str, nodes: int) -> list[float]:
    picked = [float(f) for f in text.split(",") if f.strip()] if text else []
    return (picked + [1.0] * nodes)[:nodes]


def measure(args: argparse.Namespace, out: Path) -> dict[str, Any]:
    """Starts (or joins) the cluster, runs the job, and reads the figures back from its results."""
    apply_env()
    import ray

    from pipelines.standin_hook import HOOK
    from pipelines.tiny.standin import SLOWDOWN_ENV, build_standin_catalog

    cluster = None
    names: dict[str, str] = {}
    speeds: dict[str, float] = {}  # node id -> the stand-in's sleep factor there
    slow = factors(args.slowdown, args.nodes)
    runtime_env = {"worker_process_setup_hook": HOOK, "env_vars": {"PYTHONPATH": str(ROOT)}}
    temp = tempfile.mkdtemp(prefix="rfc-", dir="/tmp")  # short: Unix socket paths are limited
    try:
        if args.address:
            ray.init(address=args.address, runtime_env=runtime_env, log_to_driver=False)
        else:
            from ray.cluster_utils import Cluster

            cluster = Cluster(initialize_head=True, head_node_args={
                "num_cpus": 0, "object_store_memory": STORE, "include_dashboard": False, "temp_dir": temp})
            for i, f in enumerate(slow):
                node = cluster.add_node(num_cpus=args.node_cpus, object_store_memory=STORE,
                                        env_vars={SLOWDOWN_ENV: f"{f:g}"})
                names[node.node_id] = f"node{i + 1} (x{f:g})"
                speeds[node.node_id] = f
            cluster.wait_for_nodes()
            ray.init(address=cluster.address, runtime_env=runtime_env, log_to_driver=False)
        catalog = str(build_standin_catalog(out / "standin", {"standin": args.ms_per_image}, watermark=False))
        manifest = write_manifest(out / "manifest.parquet", args.rows, 64)
        job_out = out / "job"
        shutil.rmtree(job_out, ignore_errors=True)  # each run measures a fresh job, not a resume
        figures = run_job(args, manifest, catalog, str(job_out), names, speeds)
    except Exception as e:  # noqa: BLE001 - recorded, the command exits 1
        figures = {"error": repr(e)}
    finally:
        ray.shutdown()
        if cluster is not None:
            cluster.shutdown()
        shutil.rmtree(temp, ignore_errors=True)
    figures["settings"] = {k: v for k, v in vars(args).items() if k != "child"} | {"slowdown": slow if not args.address else []}
    return figures


def run_job(args: argparse.Namespace, manifest: str, catalog: str, out: str, names: dict[str, str],
            speeds: dict[str, float]) -> dict[str, Any]:
    import ray

    from jobs.render import RenderJob, run
    from jobs.scaling_args import parse_workers

    workers = parse_workers(args.workers) if args.workers else None
    nodes = [n for n in ray.nodes() if n.get("Alive") and n["Resources"].get("CPU", 0) > 0]
    job = RenderJob(manifest=manifest, out=out, catalog=catalog, workers=workers.min if workers else len(nodes),
                    max_workers=workers.max if workers else None, batch_size=args.batch_size, torch_threads=1,
                    results_flush_rows=50, results_flush_s=2.0)
    stream = io.StringIO()
    report = run(job, stream=stream)
    pid_node = actor_nodes()
    figures = per_node(out, pid_node, names)
    ok = report.counts.get("ok", 0)
    actors = len(figures["actors"])
    accel_hours = actors * report.elapsed_s / 3600.0  # each actor stands for one accelerator, held the whole job
    figures.update({
        "plan": [line for line in stream.getvalue().splitlines() if "rendering" in line],
        "rows": report.total, "counts": report.counts, "elapsed_s": report.elapsed_s,
        "rows_retried": retried(out), "accelerators": actors, "gpu_hour_price": args.gpu_hour_price,
        "cost_per_1000": (accel_hours * args.gpu_hour_price / ok * 1000.0) if ok else None,
        # The same accelerators billed only for the render window: what a warm, always-busy cluster would pay.
        "cost_per_1000_render": (actors * figures["window_s"] / 3600.0 * args.gpu_hour_price / ok * 1000.0) if ok else None,
        # Every actor sleeping back to back at its node's speed, nothing else costing time.
        "ideal_images_per_s": sum(1000.0 / (args.ms_per_image * speeds.get(pid_node.get(int(w.rsplit(":", 1)[-1]), ""), 1.0))
                                  for w in figures["actors"]),
    })
    return figures


def actor_nodes() -> dict[int, str]:
    """pid -> node id of every render actor this cluster has run, dead ones too: the GCS actor table (Ray's state
    API needs the dashboard, which these clusters do not run)."""
    from ray._private.state import actors

    return {int(a["Pid"]): a["Address"]["NodeID"] for a in actors().values()
            if ACTOR_CLASS in (a.get("ActorClassName") or "") and a.get("Pid")}


def per_node(out: str, pid_node: dict[int, str], names: dict[str, str]) -> dict[str, Any]:
    """Rows, images/s and busy time per node and per actor over the render window, from the results and outputs.

    The window runs from the first row's render start (its output's time less its render_s) to the last output;
    an actor's busy time is the sum of its rows' render_s (each row's share of its batch's pipeline call, plus its
    finishing and write): the overlap runs finishing beside the next call, so it can pass 100 % of the window."""
    from storage.results import absolute_uri, read_results

    table = read_results(out).to_pydict()
    spans: list[tuple[float, float]] = []
    actors: dict[str, dict[str, Any]] = defaultdict(lambda: {"rows": 0, "busy_s": 0.0, "last": 0.0})
    for status, uri, worker, render_s in zip(table["status"], table["output_uri"], table["worker"], table["render_s"]):
        if status != "ok" or not uri:
            continue
        done = os.stat(absolute_uri(out, uri)).st_mtime
        spans.append((done - (render_s or 0.0), done))
        a = actors[worker]
        a["rows"] += 1
        a["busy_s"] += render_s or 0.0
        a["last"] = max(a["last"], done)
    if not spans:
        return {"window_s": 0.0, "images_per_s": 0.0, "nodes": {}, "actors": {}}
    start, end = min(s for s, _ in spans), max(e for _, e in spans)
    window = max(end - start, 1e-9)
    nodes: dict[str, dict[str, Any]] = {}
    for worker, a in sorted(actors.items()):
        node_id = pid_node.get(int(worker.rsplit(":", 1)[-1]), "?")
        node = nodes.setdefault(names.get(node_id, node_id[:12]), {"rows": 0, "actors": [], "idle_at_end_s": 0.0})
        node["rows"] += a["rows"]
        node["actors"].append(worker)
        node["idle_at_end_s"] = max(0.0, end - max(a["last"] for w, a in actors.items() if w in node["actors"]))
        a.update(node=names.get(node_id, node_id[:12]), busy_over_wall=a["busy_s"] / window)
    nodes = dict(sorted(nodes.items()))
    for node in nodes.values():
        node["images_per_s"] = node["rows"] / window
        node["share"] = node["rows"] / len(spans)
    return {"window_s": window, "images_per_s": len(spans) / window, "nodes": nodes,
            "actors": {w: {k: v for k, v in a.items() if k != "last"} for w, a in actors.items()}}


def retried(out: str) -> int:
    """Rows rendered more than once in this run: ids recorded more than once, or whose output already existed."""
    import pyarrow.parquet as pq

    from storage.fs import list_files
    from storage.results import log_dir

    seen: dict[str, int] = defaultdict(int)
    again = 0
    for uri in list_files(log_dir(out), suffix=".parquet"):
        part = pq.read_table(uri, columns=["id", "rerendered"]).to_pydict()
        for i, r in zip(part["id"], part["rerendered"]):
            seen[i] += 1
            again += bool(r)
    return sum(n - 1 for n in seen.values()) + again


def lines(f: dict[str, Any]) -> list[str]:
    """The figures as the terminal shows them."""
    if f.get("error"):
        return [f"bench cluster failed: {f['error']}"]
    out = [f"{f['rows']} rows {f['counts']} in {f['elapsed_s']:.1f} s; render window {f['window_s']:.1f} s",
           f"total: {f['images_per_s']:.2f} images/s (ideal {f['ideal_images_per_s']:.2f}: "
           f"{f['accelerators']} actors sleeping {f['settings']['ms_per_image']:g} ms per image times their node's factor)"]
    for name, n in f["nodes"].items():
        out.append(f"  {name}: {n['rows']} rows ({n['share']:.0%}), {n['images_per_s']:.2f} images/s, "
                   f"idle at the end {n['idle_at_end_s']:.1f} s")
    for worker, a in sorted(f["actors"].items()):
        out.append(f"  actor {worker} on {a['node']}: {a['rows']:.0f} rows, busy {a['busy_s']:.1f} s / "
                   f"{f['window_s']:.1f} s = {a['busy_over_wall']:.0%}")
    cost = f["cost_per_1000"]
    out.append(f"rows retried: {f['rows_retried']}")
    warm = f["cost_per_1000_render"]
    out.append(f"cost per 1,000 assets: {'-' if cost is None else f'{cost:.4f}'} at {f['gpu_hour_price']:g} per "
               f"accelerator-hour ({f['accelerators']} accelerators for the whole job, {f['elapsed_s']:.1f} s); "
               f"{'-' if warm is None else f'{warm:.4f}'} for the render window alone")
    return out


if __name__ == "__main__":
    sys.exit(main())
