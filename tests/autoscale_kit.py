"""A real autoscaling Ray cluster of fake nodes on this machine (Ray's `fake_multinode` provider), and an elastic
render job on it; prints one JSON line of what happened, the nodes over time included.

`cluster_utils.AutoscalingCluster` is unusable from the 2.60 wheel (its template is not shipped, and it runs
`ray stop --force`), so this writes the autoscaling config itself and starts the head in its own process group
on free ports; the fake nodes run inside that group, which is killed by its id at the end (shared/TESTING.md).
Tests run it in a subprocess: one Ray cluster per process.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
HEAD_ENV = {"RAY_FAKE_CLUSTER": "1", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "disabled",
            "RAY_USAGE_STATS_ENABLED": "0", "RAY_DATA_EXECUTION_NO_PROGRESS_TIMEOUT_S": "120",
            "RAY_DATA_DISABLE_PROGRESS_BARS": "1"}
os.environ.update({k: v for k, v in HEAD_ENV.items() if k != "RAY_FAKE_CLUSTER"})
STORE = 80 * 1024 * 1024


def free_ports(n: int) -> list[int]:
    """n distinct free ports on 127.0.0.1 (bound to port 0 together, so they differ)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def autoscaling_config(gcs_port: int, max_nodes: int, idle_minutes: float, head_cpus: int) -> dict[str, Any]:
    """The fake provider's cluster: a head with `head_cpus` and up to `max_nodes` workers of {CPU: 1, accel: 1}."""
    return {
        "cluster_name": "rf-fake",
        "max_workers": max_nodes,
        "upscaling_speed": 1.0,
        "idle_timeout_minutes": idle_minutes,
        "provider": {"type": "fake_multinode", "use_node_id_as_ip": True, "disable_node_updaters": True,
                     "disable_launch_config_check": True, "gcs_address": f"127.0.0.1:{gcs_port}"},
        "available_node_types": {
            "ray.head.default": {"resources": {"CPU": head_cpus}, "node_config": {}, "max_workers": 0},
            "accel_node": {"resources": {"CPU": 1, "accel": 1, "object_store_memory": STORE}, "node_config": {},
                           "min_workers": 0, "max_workers": max_nodes},
        },
        "head_node_type": "ray.head.default",
        "auth": {}, "docker": {}, "file_mounts": {}, "cluster_synced_files": [], "file_mounts_sync_continuously": False,
        "rsync_exclude": [], "rsync_filter": [], "initialization_commands": [], "setup_commands": [],
        "head_setup_commands": [], "worker_setup_commands": [], "head_start_ray_commands": [],
        "worker_start_ray_commands": [], "head_node": {}, "worker_nodes": {},
    }


class FakeCluster:
    """The head (`ray start --head --block` with the autoscaler) in its own process group; `stop` kills the group."""

    def __init__(self, max_nodes: int = 3, idle_minutes: float = 0.1, head_cpus: int = 2):
        import yaml

        self.tmp = tempfile.mkdtemp(prefix="rfa-", dir="/tmp")  # short: Unix socket paths are limited
        gcs, client, agent, agent_grpc, metrics, env_agent = free_ports(6)
        self.address = f"127.0.0.1:{gcs}"
        config = os.path.join(self.tmp, "autoscale.yaml")
        Path(config).write_text(yaml.safe_dump(autoscaling_config(gcs, max_nodes, idle_minutes, head_cpus)))
        cmd = ["ray", "start", "--head", "--block", f"--port={gcs}", f"--autoscaling-config={config}",
               "--node-ip-address=127.0.0.1", f"--num-cpus={head_cpus}", f"--object-store-memory={STORE}",
               f"--temp-dir={self.tmp}/r", "--include-dashboard=false", f"--ray-client-server-port={client}",
               f"--dashboard-agent-listen-port={agent}", f"--dashboard-agent-grpc-port={agent_grpc}",
               f"--metrics-export-port={metrics}", f"--runtime-env-agent-port={env_agent}"]
        env = {**os.environ, **HEAD_ENV, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
        self.log = open(os.path.join(self.tmp, "head.log"), "w")
        self.proc = subprocess.Popen(cmd, env=env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)

    def wait_ready(self, timeout: float = 90.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ray start exited {self.proc.returncode}: {self.head_log()[-2000:]}")
            try:
                with socket.create_connection(("127.0.0.1", int(self.address.rsplit(':', 1)[1])), timeout=1):
                    return
            except OSError:
                time.sleep(0.5)
        raise TimeoutError(f"the head did not come up: {self.head_log()[-2000:]}")

    def head_log(self) -> str:
        self.log.flush()
        return Path(self.log.name).read_text(errors="replace")

    def stop(self) -> None:
        """SIGTERM then SIGKILL to the whole group (gcs_server and raylet ignore SIGTERM); never `ray stop`."""
        for sig, grace in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                self.proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                continue
        if self.proc.poll() is None:
            self.proc.wait()
        self.log.close()
        shutil.rmtree(self.tmp, ignore_errors=True)


class NodeTrace:
    """Samples the alive nodes (and those with `accel`) every `every` seconds from a thread: the figure item 3 asks."""

    def __init__(self, every: float = 0.5):
        self.every, self.samples, self.started = every, [], time.monotonic()
        self.marks: list[tuple[float, str]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        import ray

        while not self._stop.is_set():
            try:
                alive = [n for n in ray.nodes() if n.get("Alive")]
                accel = sum(1 for n in alive if n["Resources"].get("accel", 0) > 0)
                self.samples.append((round(time.monotonic() - self.started, 2), len(alive), accel))
            except Exception:  # noqa: BLE001 - a sample missed while the GCS is busy
                pass
            self._stop.wait(self.every)

    def mark(self, what: str) -> None:
        self.marks.append((round(time.monotonic() - self.started, 2), what))

    def now(self) -> tuple[int, int]:
        return self.samples[-1][1:] if self.samples else (0, 0)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def changes(self) -> list[tuple[float, int, int]]:
        """The samples where the node count changed: (seconds, nodes, accel nodes)."""
        out: list[tuple[float, int, int]] = []
        for s in self.samples:
            if not out or s[1:] != out[-1][1:]:
                out.append(s)
        return out


def manifest(path: str, rows: int) -> str:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"id": [f"as.{i:04d}" for i in range(rows)], "prompt": [f"a crate {i}" for i in range(rows)],
                             "width": [64] * rows, "height": [64] * rows}), path)
    return path


def batch_job(args: argparse.Namespace, trace: NodeTrace, work: str) -> dict[str, Any]:
    """The elastic job: `--workers MIN..MAX` actors each asking `accel: 1`, which only the autoscaler's nodes have."""
    from jobs.render import RenderJob, run
    from pipelines.tiny.standin import build_standin_catalog
    from storage.results import read_results

    catalog = str(build_standin_catalog(os.path.join(work, "standin"), {"standin": args.ms}, watermark=False))
    out = os.path.join(work, "out")
    job = RenderJob(manifest=manifest(os.path.join(work, "m.parquet"), args.rows), out=out, catalog=catalog,
                    workers=args.min_workers, max_workers=args.max_workers, worker_resources={"accel": 1.0},
                    batch_size=args.batch, results_flush_rows=4, results_flush_s=0.5, torch_threads=1)
    stream = io.StringIO()
    trace.mark("job start")
    report = run(job, stream=stream)
    trace.mark("job end")
    table = read_results(out)
    return {"counts": report.counts, "total": report.total, "elapsed_s": report.elapsed_s,
            "plan": [line for line in stream.getvalue().splitlines() if "rendering" in line],
            "ids": sorted(table["id"].to_pylist()), "workers": sorted(set(table["worker"].to_pylist()))}


def wait_for_nodes(trace: NodeTrace, nodes: int, timeout: float) -> float | None:
    """Seconds until the cluster is down to `nodes` alive nodes, or None past the timeout."""
    began = time.monotonic()
    while time.monotonic() - began < timeout:
        if trace.samples and trace.now()[0] <= nodes:
            return time.monotonic() - began
        time.sleep(0.5)
    return None


def main(argv: list[str]) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rows", type=int, default=48)
    p.add_argument("--ms", type=float, default=250.0, help="the stand-in's sleep per image")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--min-workers", type=int, default=1)
    p.add_argument("--max-workers", type=int, default=3)
    p.add_argument("--idle-minutes", type=float, default=0.1)
    p.add_argument("--head-cpus", type=int, default=2, help="the head's CPUs: the job's read and shuffle tasks run there")
    p.add_argument("--release-timeout", type=float, default=120.0)
    p.add_argument("--serve", action="store_true", help="then the online endpoint: replicas up under load, to zero")
    p.add_argument("--serve-only", action="store_true", help="the online endpoint alone, no batch job")
    args = p.parse_args(argv)
    import ray

    from pipelines.standin_hook import HOOK

    cluster = FakeCluster(max_nodes=args.max_workers, idle_minutes=args.idle_minutes, head_cpus=args.head_cpus)
    work = tempfile.mkdtemp(prefix="rfa-work-")
    figures: dict[str, Any] = {}
    trace = None
    try:
        cluster.wait_ready()
        ray.init(address=cluster.address, log_to_driver=False,
                 runtime_env={"worker_process_setup_hook": HOOK})
        trace = NodeTrace()
        if not args.serve_only:
            figures["batch"] = batch_job(args, trace, work)
            figures["released_after_s"] = wait_for_nodes(trace, 1, args.release_timeout)
            trace.mark("released" if figures["released_after_s"] is not None else "not released")
        if args.serve or args.serve_only:
            from autoscale_serve import serve_case

            figures["serve"] = serve_case(trace, work, args.release_timeout)
    except BaseException as e:  # noqa: BLE001 - reported in the figures
        figures["error"] = repr(e)
        figures["head_log"] = cluster.head_log()[-3000:]
    finally:
        if trace:
            trace.stop()
            figures.update(trace=trace.changes(), marks=trace.marks, peak_nodes=max((s[1] for s in trace.samples), default=0))
        try:
            ray.shutdown()
        finally:
            cluster.stop()
            shutil.rmtree(work, ignore_errors=True)
    print("FIGURES " + json.dumps(figures), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
