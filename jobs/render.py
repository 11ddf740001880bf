"""The batch render job: validate the manifest, skip finished rows, render the rest, record results."""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import TextIO

import pyarrow.compute as pc

from cluster.batch import read_manifest, render_dataset
from cluster.ledger import LOCAL_ROWS, check_ids, compact, finished_ids, local_ids, recorded_rows, unfinished, without
from cluster.renderer_config import STARTUP_COLUMN, PoolOptions, RendererConfig, storage_env
from cluster.resources import node_resources, plan_workers
from cluster.runtime import connect
from pipelines.catalog import Catalog, CatalogError
from pipelines.policy import PromptPolicy
from storage.fs import check_uri, is_remote, join, store_errors, write_bytes
from storage.manifest import FORMATS as MANIFEST_FORMATS
from storage.manifest import ManifestError, check_files, check_schema, open_manifest
from storage.params import Limits
from storage.results import (DEFAULT_DEADLINE_S, JobStopped, ResultsUnavailable, ResultsWriter, describe,
                             error_code, new_run_id, remove_stray_parts, results_dir)
from jobs.exits import EXIT_OK, EXIT_ROWS_FAILED
from jobs.progress import Progress, Rate
from cluster.quiet import log_to_file

log = logging.getLogger(__name__)


@dataclass
class RenderJob:
    """One run of `renderfleet render`; rerunning it with the same `out` resumes."""

    manifest: str
    out: str
    catalog: str | None = None
    workers: int | None = None
    max_workers: int | None = None  # with it, an elastic pool of workers..max_workers actors (--workers MIN..MAX)
    worker_resources: dict[str, float] = field(default_factory=dict)  # custom resources per actor (--worker-resources)
    batch_size: int = 8
    address: str | None = None
    limits: Limits = field(default_factory=Limits)
    torch_threads: int | None = None
    gpus_per_worker: float = 1.0
    results_flush_rows: int = 1000
    results_flush_s: float = 10.0
    results_deadline_s: float = DEFAULT_DEADLINE_S  # how long failing results writes are retried before stopping
    model_memory_bytes: int | None = None
    safety_action: str | None = None  # block | blur | flag; default: the catalog's safety.action
    policy: dict[str, str] = field(default_factory=dict)  # memory/speed policy overrides for every model (--policy)
    input_roots: tuple[str, ...] = ()  # local folders inputs may come from besides the manifest's own


@dataclass
class JobReport:
    """What a run did, and (through exit_status) what the command exits with."""

    total: int
    skipped: int
    counts: dict[str, int]
    failures: dict[str, int]
    elapsed_s: float
    out: str
    results: str
    first_output_s: float | None = None
    model_loads: int = 0
    rerendered: int = 0  # rows whose earlier render was lost unrecorded (a lost node, a killed driver)
    rate: Rate | None = None  # jobs.progress.Rate, the one definition; None when nothing was left to do
    log: str | None = None  # the driver's log file
    startup: dict[str, float] | None = None  # where the time to the first output went (startup_figures)

    @property
    def rows_per_s(self) -> float:
        return self.rate.rows_per_s if self.rate else 0.0

    @property
    def images_per_s(self) -> float:
        return self.rate.images_per_s if self.rate else 0.0


    @property
    def failed(self) -> int:
        return self.counts.get("failed", 0)

    @property
    def failed_fraction(self) -> float:
        """Failed rows over the manifest's rows (rows skipped as done count as final)."""
        return self.failed / self.total if self.total else 0.0

    def exit_status(self, max_failed_fraction: float = 0.0) -> int:
        """0 when every row is final or failures stay within the tolerated fraction, else EXIT_ROWS_FAILED."""
        return EXIT_ROWS_FAILED if self.failed and self.failed_fraction > max_failed_fraction else EXIT_OK

    def verdict(self, max_failed_fraction: float = 0.0) -> str:
        """One line saying why the job exits as it does."""
        if not self.failed:
            return f"exit status {EXIT_OK}: every row is final"
        share = f"{self.failed} of {self.total} rows failed ({self.failed_fraction:.1%})"
        if self.exit_status(max_failed_fraction) == EXIT_OK:
            return f"exit status {EXIT_OK}: {share}, within --max-failed-fraction {max_failed_fraction:g}"
        return (f"exit status {EXIT_ROWS_FAILED}: {share}, over --max-failed-fraction {max_failed_fraction:g}; "
                "rerun the same command to retry them")

    def lines(self) -> list[str]:
        c = self.counts
        lines = [
            f"rows: {self.total} in manifest, {self.skipped} skipped (already done), "
            f"{c.get('ok', 0)} ok, {c.get('failed', 0)} failed, {c.get('filtered', 0)} filtered",
        ]
        if not sum(c.values()):
            lines.append(f"nothing to do: {self.skipped} rows already final")
        else:
            lines.append(f"speed: {self.rate.text() if self.rate else '-'} in {self.elapsed_s:.1f} s, "
                         f"first output at {self.first_output_s or 0:.1f} s"
                         + ("" if self.rate and self.rate.steady else " (too short to measure after it)"))
        if self.startup:
            lines.append(startup_line(self.startup))
        lines.append(f"model loads: {self.model_loads}")
        if self.rerendered:
            lines.append(f"rendered again: {self.rerendered} rows whose earlier render was lost before it was recorded "
                         "(a lost node or a stopped run)")
        if self.failures:
            lines.append("failures: " + ", ".join(f"{k}={v}" for k, v in self.failures.items()))
        lines += [f"outputs: {self.out}", f"results: {self.results}"]
        if self.log:
            lines.append(f"log: {self.log}")
        return lines


def manifest_folder(manifest: str) -> str:
    """Where relative input URIs in the manifest point from: its folder (or itself, for a dataset folder)."""
    if not is_remote(manifest) and os.path.isdir(manifest):
        return manifest
    if is_remote(manifest) and not manifest.lower().endswith(tuple(MANIFEST_FORMATS)):
        return manifest
    return manifest.rsplit("/", 1)[0]


def resolve_catalog(path: str | None, stream: TextIO = sys.stderr) -> str:
    """The given catalog, or the tiny random-weight one (with a warning)."""
    if path:
        return path
    from pipelines.tiny import default_catalog_path  # torch and diffusers: only runs without a catalog import them

    built = default_catalog_path()
    stream.write(f"warning: no --catalog given; using the tiny random-weight catalog {built} (outputs are noise)\n")
    return built


def run(job: RenderJob, stream: TextIO = sys.stderr) -> JobReport:
    """Runs the job to completion; raises ManifestError before rendering when the manifest is unusable, and
    JobStopped (after stopping the actors) when results cannot be written for `results_deadline_s`."""
    began = time.monotonic()
    check_uri(job.manifest, "manifest")
    check_uri(job.out, "out", write=True)
    # Actors may run elsewhere, in another working directory: local paths go absolute.
    manifest, out = (m if is_remote(m) else os.path.abspath(m) for m in (job.manifest, job.out))
    run_id = new_run_id()  # names this run's results parts, summary and log
    catalog_path = os.path.abspath(resolve_catalog(job.catalog, stream))
    catalog = Catalog.load(catalog_path)  # a malformed catalog fails here, not in every actor
    if catalog.safety.prompt_policy:
        try:
            PromptPolicy.load(catalog.safety.prompt_policy)
        except ValueError as e:
            raise CatalogError(f"{catalog_path}: safety.prompt_policy: {e}") from None
    dataset = open_manifest(manifest)
    check_schema(dataset.schema)
    check_files(dataset)
    total = dataset.count_rows()  # from the files' footers
    connecting = time.monotonic()
    connect(job.address)
    ray_s = time.monotonic() - connecting
    rows = read_manifest(manifest)
    small = total <= LOCAL_ROWS and recorded_rows(out) <= LOCAL_ROWS
    if small:  # checked here: a shuffle's start-up would cost more than the work
        ids, done = local_ids(dataset, out)
    else:  # ids checked and finished rows found by shuffles across the cluster: nothing per row on the driver
        finished = finished_ids(out)
        ids = check_ids(rows, finished, total)
    if ids.problem():
        raise ManifestError(ids.problem())
    run_log = None if is_remote(out) else log_to_file(os.path.join(out, "logs", f"{run_id}.log"))  # a usable manifest: OUT is ours
    remove_stray_parts(out, started=time.time())  # temporaries of a killed earlier run; a live writer's are newer
    skipped = ids.finished
    pending = total - skipped
    counts: Counter[str] = Counter()
    failures: Counter[str] = Counter()
    model_loads = rerendered = 0
    workers: list[dict] = []  # each actor's start-up, from its first results
    started = time.monotonic()
    if pending:
        plan = plan_workers(node_resources(), job.workers, job.gpus_per_worker, job.max_workers, job.worker_resources)
        writer_run_id = run_id
        config = RendererConfig(
            catalog_path=catalog_path,
            out=out,
            limits=job.limits,
            torch_threads=job.torch_threads or plan.torch_threads,
            env=storage_env(),
            input_base=manifest_folder(manifest),
            input_roots=tuple(os.path.abspath(r) for r in job.input_roots),
            memory_budget_bytes=job.model_memory_bytes,
            job_id=writer_run_id,
            safety_action=job.safety_action,
            pool_options=PoolOptions(policy=dict(job.policy)),
            startup_column=True,
        )
        stream.write(
            f"[renderfleet] rendering {pending} rows ({skipped} already done) on {plan.label} workers "
            f"(cpu={plan.num_cpus}, gpu={plan.num_gpus}, torch threads={config.torch_threads})\n"
        )
        writer = ResultsWriter(out, run_id=writer_run_id, flush_rows=job.results_flush_rows,
                               flush_s=job.results_flush_s, deadline_s=job.results_deadline_s)
        progress = Progress(pending, stream, started=started)
        batches = None
        try:
            if not skipped:
                left = rows
            else:
                left = without(rows, done) if small else unfinished(rows, finished, total)
            ds = render_dataset(left, config, plan, job.batch_size)
            batches = iter(ds.iter_batches(batch_size=None, batch_format="pyarrow"))
            for batch in batches:
                if STARTUP_COLUMN in batch.column_names:
                    workers += [json.loads(v) for v in batch[STARTUP_COLUMN].drop_null().to_pylist()]
                    batch = batch.drop_columns([STARTUP_COLUMN])
                statuses = batch["status"].to_pylist()
                counts.update(statuses)
                failures.update(error_code(e) for s, e in zip(statuses, batch["error"].to_pylist()) if s == "failed")
                model_loads += pc.sum(batch["model_loads"]).as_py() or 0
                rerendered += pc.sum(batch["rerendered"].cast("int64")).as_py() or 0
                progress.update(statuses)
                writer.add(batch)  # retries a failing store without waiting; raises past the deadline
            writer.flush()
        except ResultsUnavailable as e:
            raise JobStopped(out, e, earlier=skipped, outputs=counts.get("ok", 0), rendered=sum(counts.values()),
                             pending=pending) from None
        except BaseException:
            # Another failure (a Ray error, Ctrl-C): record what we can, once, never raising over it.
            try:
                saved = writer.try_flush()
            except Exception:  # noqa: BLE001 - the failure that brought us here is the one to report
                log.exception("cannot record the last results")
                saved = False
            if not saved:
                log.warning("%d rendered rows could not be recorded; they are rendered again on resume",
                            writer.buffered)
            raise
        finally:
            close_batches(batches)
            progress.close()
    report = JobReport(
        total=total,
        skipped=skipped,
        counts=dict(counts),
        failures=dict(failures.most_common()),
        elapsed_s=time.monotonic() - started,
        out=out,
        results=results_dir(out),
        first_output_s=progress.first_s if pending else None,
        model_loads=model_loads,
        rerendered=rerendered,
        rate=progress.rate(progress.elapsed_s) if pending and sum(counts.values()) else None,
        log=run_log,
        startup=startup_figures(started - began, ray_s, progress.first_s, workers) if pending else None,
    )
    if pending:
        record_run(out, writer.run_id, report, plan.workers)
    compact_results(out)
    return report


def startup_figures(before_s: float, ray_s: float, first_s: float | None, workers: list[dict]) -> dict[str, float]:
    """Seconds from the job's start to its first output, and the parts: Ray, the driver's checks, and the
    first worker to report: its process start, its imports and renderer, its model load, its first batch."""
    figures = {"ray_s": ray_s, "checks_s": before_s - ray_s}
    if first_s is not None:
        figures["first_output_s"] = before_s + first_s
    if workers:
        first = min(workers, key=lambda w: w["process_s"] + w["init_s"] + w["first_batch_s"])
        figures.update(worker_process_s=first["process_s"], worker_init_s=first["init_s"],
                       model_load_s=first["model_load_s"], first_batch_s=first["first_batch_s"])
    return figures


def startup_line(f: dict[str, float]) -> str:
    line = f"start-up: Ray {f['ray_s']:.1f} s, manifest checks {f['checks_s']:.1f} s"
    if "worker_init_s" in f:
        line += (f", a worker {f['worker_process_s'] + f['worker_init_s']:.1f} s (process {f['worker_process_s']:.1f} s, "
                 f"imports and renderer {f['worker_init_s']:.1f} s), its first batch {f['first_batch_s']:.1f} s "
                 f"(model load {f['model_load_s']:.1f} s)")
    if "first_output_s" in f:
        line += f"; first output {f['first_output_s']:.1f} s after the job started"
    return line


def compact_results(out: str) -> None:
    """Rewrites OUT/results/results.parquet, one row per id; a failing store only warns (the log parts hold every row)."""
    try:
        compact(out)
    except store_errors() as e:
        log.warning("cannot compact the results under %s (they stay readable through read_results): %s",
                    results_dir(out), describe(e))


def close_batches(batches: object) -> None:
    """Stops the actor pool now rather than whenever the iterator is collected; never raises over the job's error."""
    close = getattr(batches, "close", None)
    if close is None:
        return
    try:
        close()
    except Exception as e:  # noqa: BLE001
        log.warning("stopping the render actors: %s", describe(e))


def record_run(out: str, run_id: str, report: JobReport, workers: int) -> None:
    """Keeps each run's figures beside its results, for reports and benchmarks."""
    summary = {
        "run_id": run_id, "manifest_total": report.total, "rendered": sum(report.counts.values()), "counts": report.counts,
        "failures": report.failures, "skipped": report.skipped, "elapsed_s": report.elapsed_s,
        "rows_per_s": report.rows_per_s, "images_per_s": report.images_per_s,
        "model_loads": report.model_loads, "rerendered": report.rerendered, "workers": workers,
        "startup": report.startup,
    }
    try:
        write_bytes(join(out, "runs", f"{run_id}.json"), json.dumps(summary, indent=1).encode())
    except store_errors() as e:  # every result is recorded already; the summary only feeds reports
        log.warning("cannot record the run summary under %s: %s", join(out, "runs"), describe(e))
