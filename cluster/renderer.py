"""The renderer: the one class that turns manifest rows into outputs, for Ray Data and Ray Serve.

It fetches models and input assets through `storage`, renders through `pipelines`, and writes
each output under OUT. Every input row gives exactly one result row; a bad row fails alone.
"""

from __future__ import annotations

import hashlib
import logging
import os
import socket
import time
from collections import defaultdict
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import torch

from cluster.model_pool import ModelPool
from cluster.overlap import Overlap
from cluster.renderer_config import PoolOptions, RendererConfig, storage_env  # noqa: F401 - their home; re-exported
from cluster.rows import Checked, Filtered, Job, RowChecker
from cluster.step_progress import ProgressWriter, progress_uris
from pipelines.catalog import Catalog, ModelEntry
from pipelines.finishing import Finisher
from pipelines.loading import pick_device, quiet_hf_progress
from pipelines.media.provenance import provenance_record
from pipelines.progress import StepReport
from pipelines.tasks import render_group
from storage.fs import exists, join, write_retrying
from storage.keys import output_key
from storage.manifest import MANIFEST_COLUMNS
from storage.params import BY_NAME, ROW_DEFAULTS, RowParams, derive_seed
from storage.reasons import RowError
from storage.result_params import param_values
from storage.results import RESULT_SCHEMA, relative_uri

log = logging.getLogger(__name__)


def renderfleet_version() -> str:
    try:
        from importlib.metadata import version

        return version("renderfleet")
    except Exception:  # noqa: BLE001 - running from a bare checkout
        return "0+unknown"


def extra_defaults(entry: ModelEntry) -> dict[str, Any]:
    """Catalog defaults that are family-specific call arguments (t0, noise_level, ...), passed as they are."""
    return {k: v for k, v in entry.defaults.items() if k not in ROW_DEFAULTS}


def stage_defaults(entry: ModelEntry) -> dict[str, Any]:
    """A later cascade stage runs on its own catalog defaults."""
    return {**extra_defaults(entry), **{k: v for k, v in entry.defaults.items() if k in BY_NAME and BY_NAME[k].call}}


def output_size(task: str, decoded: Any) -> tuple[int | None, int | None]:
    """The size actually rendered (cascades and class-conditional families pick their own)."""
    if task in ("image", "edit"):
        return decoded.size
    if task == "video" and len(decoded):
        return decoded[0].shape[1], decoded[0].shape[0]
    return None, None


@dataclass
class Rendered:
    """A group's decoded outputs, waiting to be checked, finished and written off the render path."""

    jobs: list[Job]
    decoded: list[Any]
    records: list[dict[str, str]]
    render_s: float  # the pipeline call's seconds per row


class Renderer:
    """A `map_batches` callable (pyarrow batches in, result batches out) holding loaded pipelines.

    Thread-safe: concurrent calls overlap one batch's pipeline call with earlier batches' finishing."""

    def __init__(self, config: RendererConfig):
        from cluster.quiet import quiet_actor; quiet_actor()  # noqa: E702 - known-harmless warnings off (see cluster/quiet.py)
        self.config = config
        os.environ.update(config.env)
        quiet_hf_progress()
        if config.torch_threads:
            torch.set_num_threads(config.torch_threads)
        self.catalog = Catalog.load(config.catalog_path)
        self.device = pick_device(config.device)
        self.pool = ModelPool(self.catalog, self.device, config.memory_budget_bytes, config.model_cache_dir,
                              config.pool_options)
        self.worker = f"{socket.gethostname()}:{os.getpid()}"
        self.version = renderfleet_version()
        safety = self.catalog.safety
        checker = self.pool.local(self.catalog.get(safety.checker).source) if safety.checker else None
        self.finisher = Finisher(safety, checker, device=self.device, action=config.safety_action)
        self.rows = RowChecker(self.catalog, config.limits, self.finisher, self.pool, config.input_base, config.input_roots)
        self.overlap = Overlap(config.overlap_batches)
        self.progress = ProgressWriter()  # job rows' denoising steps, for their runner (cluster/step_progress.py)

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows, loads = self._render_rows(batch.to_pylist(), keep_data=False)
        for r in rows:  # the results table stores output URIs relative to OUT; render_rows' callers get absolute ones
            r["output_uri"] = relative_uri(self.config.out, r.get("output_uri"))
        if rows:
            rows[0]["model_loads"] = loads
        results = pa.Table.from_pylist(rows, schema=RESULT_SCHEMA)
        for name in batch.column_names:
            if name not in MANIFEST_COLUMNS and name not in RESULT_SCHEMA.names:
                results = results.append_column(batch.schema.field(name), batch.column(name))
        return results

    def render_rows(self, rows: list[dict[str, Any]], keep_data: bool = False,
                    caller_writes: Collection[str] = ()) -> list[dict[str, Any]]:
        """Renders and writes every row; rows sharing call parameters share one pipeline call.

        Every row is checked before any model loads, so a block of bad rows costs no load. With keep_data,
        an `ok` row also carries its output's bytes as `data` (the online path answers from memory). Rows
        whose ids are in caller_writes are finished but not written: their results carry `data` and
        `written: False`, and `output_uri` says where the caller stores them (the online path, after answering).
        """
        return self._render_rows(rows, keep_data, frozenset(caller_writes))[0]

    def _render_rows(self, rows: list[dict[str, Any]], keep_data: bool,
                     caller_writes: frozenset[str] = frozenset()) -> tuple[list[dict[str, Any]], int]:
        """The results and the model loads this batch caused; its finishing overlaps the next batch's render."""
        with self.overlap.batch() as number:
            with self.overlap.rendering(number):
                loads = self.pool.loads
                results, rendered = self._render_all(rows)
                loads = self.pool.loads - loads
            with self.overlap.finishing(number):
                for group in rendered:
                    for job, result in self._finish_group(group, rows, keep_data, caller_writes):
                        results[job.index] = result
        return results, loads  # type: ignore[return-value]

    def _render_all(self, rows: list[dict[str, Any]]) -> tuple[list[dict[str, Any] | None], list[Rendered]]:
        """Checks and renders every row: final results for rows that ended here, decoded outputs for the rest."""
        results: list[dict[str, Any] | None] = [None] * len(rows)
        checked: list[Checked] = []
        for i, row in enumerate(rows):
            done, results[i] = self._attempt(row, self.rows.check, i, row)
            if done is not None:
                checked.append(done)
        groups: dict[tuple, list[Job]] = defaultdict(list)
        for c in checked:
            job, results[c.index] = self._attempt(rows[c.index], self._complete, c, params=c.params)
            if job is not None:
                groups[job.group].append(job)
        rendered: list[Rendered] = []
        for jobs in groups.values():
            for done in self._render_group(jobs, rows):
                if isinstance(done, Rendered):
                    rendered.append(done)
                else:
                    results[done[0].index] = done[1]
        return results, rendered

    def _complete(self, checked: Checked) -> Job:
        return self.rows.complete(checked, self.pool.stages(checked.entry)[0])

    def _attempt(self, row: dict[str, Any], step: Any, *args: Any, params: RowParams | None = None
                 ) -> tuple[Any, dict[str, Any] | None]:
        """One preparation step for a row: (its value, None), or (None, the row's final result)."""
        try:
            return step(*args), None
        except Filtered as e:
            return None, self._result(row, status="filtered", params=params, filter_reason=e.reason)
        except RowError as e:
            return None, self._result(row, status="failed", params=params, error=str(e))
        except Exception as e:  # noqa: BLE001 - never lose the row
            log.exception("cannot prepare row %r", row.get("id"))
            return None, self._result(row, status="failed", params=params,
                                      error=f"internal_error: {type(e).__name__}: {e}")

    # -- rendering -------------------------------------------------------------------------

    def _render_group(self, jobs: list[Job], rows: list[dict[str, Any]]) -> list[Rendered | tuple[Job, dict[str, Any]]]:
        """One pipeline call for the group; if it fails, each row alone so one bad row fails alone."""
        first = jobs[0]
        p = first.params
        started = time.perf_counter()
        try:
            stages = self.pool.stages(first.entry)
            try:
                loras, embeddings = self.rows.adapter_refs(p)
                self.pool.adapters(first.entry).activate(stages[0], loras, embeddings)
            except RowError:
                raise
            except (FileNotFoundError, OSError, ValueError) as e:
                raise RowError("model_load_error", f"cannot load adapters {p.loras or ''} {p.embeddings or ''}: {e}") from None
            shared = {**extra_defaults(first.entry), **dict(p.call_values()), "width": first.width, "height": first.height}
            later = [self.catalog.pipeline(n) for n in first.entry.stages]
            call = (p.task, [(stages[0], shared)] + [(pipe, stage_defaults(e)) for pipe, e in zip(stages[1:], later)],
                    [j.request for j in jobs])
            with self.progress.reporting(progress_uris(self.config.out, [rows[j.index] for j in jobs])) as on_step:
                decoded = self._call(*call) if on_step is None else self._call(*call, on_step=on_step)
        except RowError as e:
            return [(j, self._result(rows[j.index], status="failed", error=str(e), job=j)) for j in jobs]
        except Exception as e:  # noqa: BLE001 - a render failure is a row failure, never a job failure
            if len(jobs) > 1:
                return [pair for j in jobs for pair in self._render_group([j], rows)]
            log.exception("render failed for row %r", p.id)
            return [(first, self._result(rows[first.index], status="failed", error=f"render_error: {type(e).__name__}: {e}", job=first))]
        # Provenance records read the model pool, which only the render side touches.
        return [Rendered(jobs, decoded, [self._record(j) for j in jobs], (time.perf_counter() - started) / len(jobs))]

    def _call(self, task: str, stages: list[tuple[Any, dict[str, Any]]], requests: list[Any],
              on_step: StepReport | None = None) -> list[Any]:
        """The pipeline call itself (a stand-in renderer overrides this to model an accelerator). on_step is
        passed only for rows that asked for step progress (async jobs), so overrides may leave it out."""
        return render_group(task, stages, requests, on_step)

    def _finish_group(self, group: Rendered, rows: list[dict[str, Any]], keep_data: bool,
                      caller_writes: frozenset[str] = frozenset()) -> list[tuple[Job, dict[str, Any]]]:
        """Safety check (one pass for the group), then each output finished and durably written."""
        task = group.jobs[0].params.task
        started = time.perf_counter()
        try:
            flags = self.finisher.flags(task, group.decoded)
        except Exception as e:  # noqa: BLE001 - an unchecked output is never written
            log.exception("safety check failed")
            return [(j, self._result(rows[j.index], status="failed", error=f"safety_check_error: {e}", job=j)) for j in group.jobs]
        share = group.render_s + (time.perf_counter() - started) / len(group.jobs)
        return [(j, self._write(j, out, flag, rows[j.index], share, record, keep_data, j.params.id not in caller_writes))
                for j, out, flag, record in zip(group.jobs, group.decoded, flags, group.records)]

    def _write(self, job: Job, decoded: Any, flagged: bool | None, row: dict[str, Any], render_s: float,
               record: dict[str, str], keep_data: bool = False, write: bool = True) -> dict[str, Any]:
        started = time.perf_counter()
        p = job.params
        width, height = output_size(p.task, decoded)
        try:
            done = self.finisher.finish(p.task, decoded, flagged, p.output_format, p.fps, record)
            if done.blocked:
                return self._result(row, status="filtered", job=job, filter_reason="nsfw_output", nsfw=True,
                                    safety_action="block", render_s=render_s)
            uri = join(self.config.out, output_key(p.task, p.id, done.ext))
            # An earlier render's output whose result was lost (a node, a killed driver); never for a caller's write.
            rendered_before = write and exists(uri)
            if write:
                write_retrying(uri, done.data, content_type=done.content_type, deadline_s=self.config.write_deadline_s)
        except Exception as e:  # noqa: BLE001
            log.exception("cannot finish or write row %r", p.id)
            return self._result(row, status="failed", error=f"write_error: {type(e).__name__}: {e}", job=job)
        # Bytes only once written (`ok` means stored), or when the caller writes them itself.
        kept = {"data": done.data} if keep_data or not write else {}
        if not write:
            kept.update(written=False, content_type=done.content_type)
        return self._result(
            row,
            status="ok",
            job=job,
            width=width,
            height=height,
            output_uri=uri,
            sha256=hashlib.sha256(done.data).hexdigest(),
            render_s=render_s + time.perf_counter() - started,
            nsfw=done.nsfw,
            safety_action=done.safety_action,
            watermark=done.watermark,
            c2pa=done.c2pa,
            rerendered=rendered_before,
            **kept,
        )

    def _record(self, job: Job) -> dict[str, str]:
        p = job.params
        return provenance_record(
            version=self.version, model=job.entry.name, model_hash=self.pool.model_hash(job.entry), seed=p.seed,
            steps=p.num_inference_steps, guidance=p.guidance_scale, job_id=self.config.job_id, row_id=p.id,
            prompt=p.prompt, include_prompt=self.catalog.safety.include_prompt,
        )

    def _result(self, row: dict[str, Any], status: str, job: Job | None = None, params: RowParams | None = None,
                **fields: Any) -> dict[str, Any]:
        # Raw values only where they fit the results schema: a failed row's bad value is in its error.
        # The seed is always set: the row's own, else the id-derived one the render would have used.
        seed = row.get("seed")
        if job is not None:
            params = job.params
        result = {
            "id": row.get("id"),
            "task": row.get("task") or "image",
            "status": status,
            "seed": seed if _fits(seed, 2**63) else derive_seed(str(row.get("id"))),
            "model": row.get("model") or self.catalog.default_model,
            "width": row.get("width") if _fits(row.get("width"), 2**31) else None,
            "height": row.get("height") if _fits(row.get("height"), 2**31) else None,
            "worker": self.worker,
            # The call parameters as resolved (defaults applied); a row that failed before resolving keeps
            # the raw values that fit their columns.
            **param_values(row if params is None else params),
        }
        if job is not None:
            result.update(model=job.entry.name, seed=job.params.seed, width=job.width, height=job.height)
        elif params is not None:
            result.update(seed=params.seed)
        result.update(fields)
        return result


def _fits(value: Any, bound: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < bound
