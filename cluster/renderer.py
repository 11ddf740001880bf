"""The renderer: the one class that turns manifest rows into outputs, for Ray Data and Ray Serve.

It fetches models through `storage`, renders through `pipelines`, and writes each output
under OUT. Every input row gives exactly one result row; a bad row fails alone.
"""

from __future__ import annotations

import hashlib
import logging
import os
import socket
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import torch

from pipelines.catalog import Catalog, ModelEntry, UnknownModel, renderfleet_home
from pipelines.encode import encode_image
from pipelines.images import generate_images
from pipelines.loading import ModelLoadError, default_size, load_pipeline, pick_device, quiet_hf_progress
from storage.cache import fetch_prefix
from storage.fs import is_s3, join, write_bytes
from storage.keys import output_key
from storage.manifest import MANIFEST_COLUMNS, Limits, RowError, RowParams, check_size, resolve_row
from storage.results import RESULT_SCHEMA

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RendererConfig:
    """Everything an actor needs; plain data so it travels to every worker."""

    catalog_path: str
    out: str
    limits: Limits = field(default_factory=Limits)
    device: str = "auto"
    torch_threads: int | None = None
    model_cache_dir: str | None = None
    env: dict[str, str] = field(default_factory=dict)


def storage_env() -> dict[str, str]:
    """The driver's AWS settings, so actors reach the same store the driver validated against."""
    return {k: v for k, v in os.environ.items() if k.startswith("AWS_")}


@dataclass
class _Job:
    index: int
    entry: ModelEntry
    params: RowParams
    width: int
    height: int

    @property
    def group(self) -> tuple:
        p = self.params
        return (self.entry.name, p.task, self.width, self.height, p.num_inference_steps, p.guidance_scale)


class Renderer:
    """A `map_batches` callable (pyarrow batches in, result batches out) holding loaded pipelines."""

    def __init__(self, config: RendererConfig):
        self.config = config
        os.environ.update(config.env)
        quiet_hf_progress()
        if config.torch_threads:
            torch.set_num_threads(config.torch_threads)
        self.catalog = Catalog.load(config.catalog_path)
        self.device = pick_device(config.device)
        self.worker = f"{socket.gethostname()}:{os.getpid()}"
        self.pipelines: dict[str, Any] = {}
        self.load_errors: dict[str, str] = {}
        self.loads = 0

    def __call__(self, batch: pa.Table) -> pa.Table:
        results = pa.Table.from_pylist(self.render_rows(batch.to_pylist()), schema=RESULT_SCHEMA)
        for name in batch.column_names:
            if name not in MANIFEST_COLUMNS and name not in RESULT_SCHEMA.names:
                results = results.append_column(batch.schema.field(name), batch.column(name))
        return results

    def render_rows(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Renders and writes every row; rows sharing call parameters share one pipeline call."""
        results: list[dict[str, Any] | None] = [None] * len(rows)
        groups: dict[tuple, list[_Job]] = defaultdict(list)
        for i, row in enumerate(rows):
            try:
                job = self._prepare(i, row)
            except RowError as e:
                results[i] = self._result(row, status="failed", error=str(e))
                continue
            except Exception as e:  # noqa: BLE001 - never lose the row
                log.exception("cannot prepare row %r", row.get("id"))
                results[i] = self._result(row, status="failed", error=f"internal_error: {type(e).__name__}: {e}")
                continue
            groups[job.group].append(job)
        for jobs in groups.values():
            for job, result in self._render_group(jobs, rows):
                results[job.index] = result
        return results  # type: ignore[return-value]

    def _prepare(self, index: int, row: dict[str, Any]) -> _Job:
        try:
            entry = self.catalog.get(row.get("model"))
        except UnknownModel as e:
            raise RowError("unknown_model", e.message) from None
        params = resolve_row(row, entry.defaults, self.config.limits)
        if params.task not in entry.tasks:
            raise RowError("unsupported_task", f"model {entry.name!r} serves {', '.join(entry.tasks)}, not {params.task!r}")
        pipe = self._pipeline(entry)
        native_w, native_h = default_size(pipe)
        width, height = params.width or native_w, params.height or native_h
        check_size(width, height, self.config.limits)
        return _Job(index, entry, params, width, height)

    def _pipeline(self, entry: ModelEntry) -> Any:
        """The loaded pipeline for `entry`, loading it on first use (a failure is remembered)."""
        if entry.name in self.pipelines:
            return self.pipelines[entry.name]
        if entry.name in self.load_errors:
            raise RowError("model_load_error", self.load_errors[entry.name])
        try:
            source = entry.source
            if is_s3(source):
                cache = self.config.model_cache_dir or str(renderfleet_home() / "models")
                source = str(fetch_prefix(source, cache))
            started = time.perf_counter()
            pipe = load_pipeline(entry, source, self.device)
            log.info("loaded %s in %.1fs on %s", entry.name, time.perf_counter() - started, self.device)
        except (ModelLoadError, FileNotFoundError, OSError) as e:
            self.load_errors[entry.name] = str(e)
            raise RowError("model_load_error", str(e)) from None
        self.loads += 1
        self.pipelines[entry.name] = pipe
        return pipe

    def _render_group(self, jobs: list[_Job], rows: list[dict[str, Any]]) -> list[tuple[_Job, dict[str, Any]]]:
        """One pipeline call for the group; if it fails, each row alone so one bad row fails alone."""
        first = jobs[0]
        started = time.perf_counter()
        try:
            images = generate_images(
                self.pipelines[first.entry.name],
                [j.params.prompt for j in jobs],
                [j.params.negative_prompt for j in jobs],
                [j.params.seed for j in jobs],
                num_inference_steps=first.params.num_inference_steps,
                guidance_scale=first.params.guidance_scale,
                width=first.width,
                height=first.height,
            )
        except Exception as e:  # noqa: BLE001 - a render failure is a row failure, never a job failure
            if len(jobs) > 1:
                return [pair for j in jobs for pair in self._render_group([j], rows)]
            log.exception("render failed for row %r", first.params.id)
            return [(first, self._result(rows[first.index], status="failed", error=f"render_error: {type(e).__name__}: {e}", job=first))]
        share = (time.perf_counter() - started) / len(jobs)
        return [(j, self._write(j, image, rows[j.index], share)) for j, image in zip(jobs, images)]

    def _write(self, job: _Job, image: Any, row: dict[str, Any], render_s: float) -> dict[str, Any]:
        started = time.perf_counter()
        try:
            data, ext, content_type = encode_image(image, job.params.output_format)
            uri = join(self.config.out, output_key(job.params.task, job.params.id, ext))
            write_bytes(uri, data, content_type=content_type)
        except Exception as e:  # noqa: BLE001
            return self._result(row, status="failed", error=f"write_error: {type(e).__name__}: {e}", job=job)
        return self._result(
            row,
            status="ok",
            job=job,
            output_uri=uri,
            sha256=hashlib.sha256(data).hexdigest(),
            render_s=render_s + time.perf_counter() - started,
        )

    def _result(self, row: dict[str, Any], status: str, job: _Job | None = None, **fields: Any) -> dict[str, Any]:
        result = {
            "id": row.get("id"),
            "task": row.get("task") or "image",
            "status": status,
            "seed": row.get("seed"),
            "model": row.get("model") or self.catalog.default_model,
            "width": row.get("width"),
            "height": row.get("height"),
            "worker": self.worker,
        }
        if job is not None:
            result.update(model=job.entry.name, seed=job.params.seed, width=job.width, height=job.height)
        result.update(fields)
        return result
