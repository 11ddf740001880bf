"""What every benchmark section shares: its settings, its Ray session, catalogs, manifests and result shape.

A section is a function `Ctx -> dict` (see `section_result`); bench/run.py runs each in its own
process so a slow or crashed section loses only itself and Serve never shares Ray with Ray Data.
"""

from __future__ import annotations

import os
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import pyarrow as pa
import pyarrow.parquet as pq
import yaml

ROOT = Path(__file__).resolve().parent.parent
# Ray on loopback, no auth for a throwaway local cluster, quiet Data progress, stalls fail in minutes.
BENCH_ENV = {
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "RAY_AUTH_MODE": "disabled",
    "RAY_DATA_DISABLE_PROGRESS_BARS": "1",
    "RAY_DATA_EXECUTION_NO_PROGRESS_TIMEOUT_S": "120",
}
STANDIN_HOOK = "pipelines.tiny.standin.register"  # diffusers resolves the stand-in's class by name, in every worker


@dataclass
class Ctx:
    """One section's run: where it works, how big it is, and the knobs the command line exposes."""

    work: Path
    smoke: bool
    d_rows: tuple[int, ...] = ()
    scale_workers: tuple[int, ...] = ()
    options: dict[str, Any] = field(default_factory=dict)

    def pick(self, full: Any, smoke: Any) -> Any:
        """The full-run value, or the seconds-long smoke value."""
        return smoke if self.smoke else full


def apply_env() -> None:
    for k, v in BENCH_ENV.items():
        os.environ.setdefault(k, v)


def start_ray(num_cpus: int | None = None, standin: bool = False) -> float:
    """Starts this process's local Ray; returns the seconds it took. With `standin`, every worker registers the
    stand-in class first (it imports diffusers, seconds per worker, so only sections that render stand-ins ask)."""
    import ray

    apply_env()
    runtime_env: dict[str, Any] = {"env_vars": {"PYTHONPATH": str(ROOT)}}
    if standin:
        from pipelines.tiny.standin import register

        register()
        runtime_env["worker_process_setup_hook"] = STANDIN_HOOK
    started = time.perf_counter()
    ray.init(address="local", num_cpus=num_cpus or os.cpu_count(), include_dashboard=False, runtime_env=runtime_env,
             log_to_driver=True, _temp_dir=short_temp())
    return time.perf_counter() - started


def short_temp() -> str:
    """Ray's socket paths are limited to ~107 characters: a short per-process temp dir."""
    path = f"/tmp/rfb-{os.getpid()}"
    os.makedirs(path, exist_ok=True)
    return path


def stop_ray() -> None:
    import ray

    if ray.is_initialized():
        ray.shutdown()


def tiny_sd_catalog(folder: Path, watermark: bool = False, checker: bool = False,
                    serve: dict[str, Any] | None = None) -> str:
    """A catalog of the tiny SD model alone, finishing off unless asked (so rendering is what is measured)."""
    from pipelines.tiny import default_catalog_path

    tiny = Path(default_catalog_path())
    data = yaml.safe_load(tiny.read_text())
    models = {"tiny-sd": dict(data["models"]["tiny-sd"], source=str(tiny.parent / "tiny-sd"))}
    safety: dict[str, Any] = {"watermark": watermark}
    if checker:
        entry = data["models"]["tiny-safety-checker"]
        models["tiny-safety-checker"] = dict(entry, source=str(tiny.parent / entry["source"]))
        safety["checker"] = "tiny-safety-checker"
    if serve:
        models["tiny-sd"]["serve"] = serve
    folder.mkdir(parents=True, exist_ok=True)
    name = f"sd-{'wm' if watermark else 'nowm'}-{'chk' if checker else 'nochk'}{'-serve' if serve else ''}.yaml"
    path = folder / name
    path.write_text(yaml.safe_dump({"default_model": "tiny-sd", "safety": safety, "models": models}, sort_keys=False))
    return str(path)


def standin_catalog(folder: Path, ms_per_image: float, watermark: bool = False, checker: bool = False) -> str:
    """A catalog of one stand-in renderer (`ms_per_image` 0 is the no-op), finishing as asked."""
    from pipelines.tiny.standin import build_standin_catalog

    path = build_standin_catalog(folder, {"standin": ms_per_image}, watermark=watermark)
    if checker:
        from pipelines.tiny import default_catalog_path

        tiny = Path(default_catalog_path())
        data = yaml.safe_load(path.read_text())
        data["models"]["tiny-safety-checker"] = {"kind": "safety_checker", "source": str(tiny.parent / "tiny-safety-checker")}
        data["safety"]["checker"] = "tiny-safety-checker"
        path.write_text(yaml.safe_dump(data, sort_keys=False))
    return str(path)


def write_manifest(path: Path, rows: int, size: int, steps: int = 1, start: int = 0, chunk: int = 200_000) -> str:
    """A text-to-image manifest of `rows` rows (ids start..start+rows), written in chunks so 1M rows stay cheap."""
    path.parent.mkdir(parents=True, exist_ok=True)
    schema = pa.schema([("id", pa.string()), ("prompt", pa.string()), ("width", pa.int64()), ("height", pa.int64()),
                        ("num_inference_steps", pa.int64())])
    with pq.ParquetWriter(path, schema) as writer:
        for lo in range(start, start + rows, chunk):
            hi = min(lo + chunk, start + rows)
            n = hi - lo
            writer.write_table(pa.table({
                "id": [f"b{i:08d}" for i in range(lo, hi)],
                "prompt": [f"benchmark scene {i % 97}" for i in range(lo, hi)],
                "width": pa.array([size] * n, pa.int64()), "height": pa.array([size] * n, pa.int64()),
                "num_inference_steps": pa.array([steps] * n, pa.int64()),
            }, schema=schema), row_group_size=min(n, 50_000))
    return str(path)


def run_job(manifest: str, out: Path, catalog: str, workers: int, batch_size: int, torch_threads: int | None = None,
            flush_rows: int = 1000) -> Any:
    """One renderfleet batch job through the public entry point (jobs.render.run), as `renderfleet render` runs it."""
    import io

    from jobs.render import RenderJob, run

    job = RenderJob(manifest, str(out), catalog=catalog, workers=workers, batch_size=batch_size,
                    torch_threads=torch_threads, results_flush_rows=flush_rows, results_flush_s=30.0)
    report = run(job, stream=io.StringIO())
    if report.failed:
        raise RuntimeError(f"bench job {out}: {report.failures}")
    return report


def timed(fn: Callable[[], Any], repeat: int) -> float:
    """Median seconds of `repeat` calls after one warm-up call."""
    fn()
    runs = []
    for _ in range(max(1, repeat)):
        started = time.perf_counter()
        fn()
        runs.append(time.perf_counter() - started)
    return statistics.median(runs)


def pct(values: list[float], q: float) -> float:
    """The q-quantile (nearest rank) of values."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))] if ordered else 0.0


def target(figure: str, value: float, op: str, threshold: float, text: str | None = None) -> dict[str, Any]:
    """One target next to its figure: pass or miss."""
    ok = value >= threshold if op == ">=" else value <= threshold
    return {"figure": figure, "value": value, "op": op, "threshold": threshold, "pass": bool(ok),
            "text": text or f"{'≥' if op == '>=' else '≤'} {threshold:g}"}


def section_result(title: str, figures: dict[str, float], units: dict[str, str], targets: list[dict[str, Any]],
                   settings: dict[str, Any], notes: list[str], plot: dict[str, Any] | None = None) -> dict[str, Any]:
    """The one shape every section returns (bench/report.py reads it)."""
    return {"title": title, "figures": {k: float(v) for k, v in figures.items()}, "units": units,
            "targets": targets, "settings": settings, "notes": notes, "plot": plot}


def _burn(duty: float, stop: Any) -> None:
    while not stop.is_set():
        began = time.perf_counter()
        while time.perf_counter() - began < duty * 0.01:
            pass
        time.sleep((1.0 - duty) * 0.01)


class BackgroundLoad:
    """A process that keeps `cores` of one core busy (10 ms duty cycles): a stand-in for what Ray's own
    processes take beside a job, to show what that much CPU costs a plain loop by itself."""

    def __init__(self, cores: float):
        import multiprocessing

        ctx = multiprocessing.get_context("spawn")
        self.stop = ctx.Event()
        self.process = ctx.Process(target=_burn, args=(min(1.0, cores), self.stop), daemon=True)

    def __enter__(self) -> BackgroundLoad:
        self.process.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop.set()
        self.process.join(10)


class CpuProfile:
    """CPU seconds per process role while a job runs (sampled, so processes that exit mid-run still count):
    on a CPU-only machine every second Ray, the driver or another job spends is a second the renderer lost."""

    def __init__(self, every_s: float = 0.25):
        import threading

        self.every_s = every_s
        self.first: dict[int, tuple[str, float]] = {}
        self.last: dict[int, float] = {}
        self.started = self.wall_s = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "CpuProfile":
        self._sample(baseline=True)
        self.started = time.perf_counter()
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()
        self.wall_s = time.perf_counter() - self.started

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            self._sample()

    def _sample(self, baseline: bool = False) -> None:
        import psutil

        for p in psutil.process_iter(["pid", "name", "cmdline", "cpu_times"]):
            times = p.info["cpu_times"]
            if times is None:
                continue
            used = times.user + times.system
            # A process born during the run counts from zero; its role is re-read, since a Ray worker takes its
            # title (ray::MapWorker...) only once it runs a task.
            first = self.first[p.pid][1] if p.pid in self.first else (used if baseline else 0.0)
            self.first[p.pid] = (_role(p.info, os.getpid()), first)
            self.last[p.pid] = used

    def by_role(self) -> dict[str, float]:
        """CPU seconds per role over the run, largest first."""
        roles: dict[str, float] = {}
        for pid, (role, first) in self.first.items():
            roles[role] = roles.get(role, 0.0) + max(0.0, self.last.get(pid, first) - first)
        return dict(sorted(((r, s) for r, s in roles.items() if s >= 0.05), key=lambda kv: -kv[1]))

    def lines(self) -> list[str]:
        cores = os.cpu_count() or 1
        total = self.wall_s * cores
        return [f"{role}: {s:.1f} CPU s ({s / total:.0%} of {cores} cores × {self.wall_s:.1f} s)"
                for role, s in self.by_role().items()]


def _role(info: dict[str, Any], me: int) -> str:
    """A process's role: this driver, a Ray worker by its title (the renderer actor, a read task...), Ray's own
    daemons by name, or anything else on the machine."""
    if info["pid"] == me:
        return "driver (this process)"
    cmd = " ".join(info.get("cmdline") or [])
    name = info.get("name") or ""
    if cmd.startswith("ray::"):
        title = cmd.split()[0].removeprefix("ray::")
        return "ray worker: " + ("idle" if title == "IDLE" else title.split(".")[0][:60])
    if "default_worker.py" in cmd:
        return "ray worker: starting"
    for daemon in ("raylet", "gcs_server", "dashboard", "log_monitor", "runtime_env", "monitor.py"):
        if daemon in name or daemon in cmd.split(" --")[0]:
            return f"ray daemon: {daemon.removesuffix('.py')}"
    return "other processes"


def median_render_s(out: Path) -> float:
    """A job's median render_s per row (each row's share of its batch's pipeline call plus its own write): the
    median, since the first batch's includes the model load."""
    from storage.results import read_results

    values = [v for v in read_results(str(out))["render_s"].to_pylist() if v is not None]
    return statistics.median(values) if values else 0.0
