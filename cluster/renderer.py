"""The renderer: the one class that turns manifest rows into outputs, for Ray Data and Ray Serve.

It fetches models and input assets through `storage`, renders through `pipelines`, and writes
each output under OUT. Every input row gives exactly one result row; a bad row fails alone.
"""

from __future__ import annotations

import gc
import hashlib
import logging
import os
import socket
import time
from collections import OrderedDict, defaultdict
from dataclasses import dataclass, field, replace
from typing import Any

import pyarrow as pa
import torch

from pipelines.adapters import AdapterState, Embedding, Lora
from pipelines.catalog import Catalog, ModelEntry, UnknownModel, renderfleet_home
from pipelines.inputs import InputError, decode_image, edit_size
from pipelines.loading import (
    ModelLoadError,
    apply_policy,
    default_size,
    derive,
    load_base,
    load_controlnet,
    memory_bytes,
    pick_device,
    pick_dtype,
    quiet_hf_progress,
)
from pipelines.finishing import Finisher
from pipelines.provenance import provenance_record, weights_hash
from pipelines.tasks import Request, call_parameters, render_group, takes_prompt
from storage.cache import fetch_prefix
from storage.fs import is_s3, join, read_bytes, write_bytes
from storage.keys import id_hash, output_key
from storage.manifest import MANIFEST_COLUMNS, PARAMETERS, TASKS, Limits, RowError, RowParams, check_size, resolve_row
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
    input_base: str | None = None  # relative input URIs are relative to this (the manifest's folder)
    memory_budget_bytes: int | None = None  # loaded pipelines per actor; default from the device
    job_id: str = ""
    safety_action: str | None = None  # overrides the catalog's safety.action for this job


def storage_env() -> dict[str, str]:
    """The driver's AWS settings, so actors reach the same store the driver validated against."""
    return {k: v for k, v in os.environ.items() if k.startswith("AWS_")}


class Filtered(Exception):
    """A row the safety policy stops; final (`status = filtered`), never retried."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def renderfleet_version() -> str:
    try:
        from importlib.metadata import version

        return version("renderfleet")
    except Exception:  # noqa: BLE001 - running from a bare checkout
        return "0+unknown"


def default_budget(device: torch.device) -> int:
    """Most of the accelerator's memory, or half of the host's available memory on CPU."""
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).total_memory * 0.8)
    import psutil

    return int(psutil.virtual_memory().available * 0.5)


def extra_defaults(entry: ModelEntry) -> dict[str, Any]:
    """Catalog defaults that are family-specific call arguments (t0, noise_level, ...), passed as they are."""
    return {k: v for k, v in entry.defaults.items() if k not in PARAMETERS}


def stage_defaults(entry: ModelEntry) -> dict[str, Any]:
    """A later cascade stage runs on its own catalog defaults."""
    names = ("num_inference_steps", "guidance_scale", "strength")
    return {**extra_defaults(entry), **{k: entry.defaults[k] for k in names if k in entry.defaults}}


def output_size(task: str, decoded: Any) -> tuple[int | None, int | None]:
    """The size actually rendered (cascades and class-conditional families pick their own)."""
    if task in ("image", "edit"):
        return decoded.size
    if task == "video" and len(decoded):
        return decoded[0].shape[1], decoded[0].shape[0]
    return None, None


@dataclass
class _Job:
    index: int
    entry: ModelEntry
    params: RowParams
    request: Request
    width: int | None
    height: int | None

    @property
    def group(self) -> tuple:
        p = self.params
        return (self.entry.name, p.task, self.width, self.height, p.num_inference_steps, p.guidance_scale, p.strength,
                p.image_guidance_scale, p.num_frames, p.audio_length_in_s, p.controlnet_conditioning_scale, p.loras,
                p.embeddings)


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
        self.budget = config.memory_budget_bytes or default_budget(self.device)
        self.worker = f"{socket.gethostname()}:{os.getpid()}"
        self.bases: OrderedDict[tuple, Any] = OrderedDict()  # LRU of loaded checkpoints
        self.base_bytes: dict[tuple, int] = {}
        self.adapters: dict[tuple, AdapterState] = {}
        self.pipelines: dict[str, tuple[tuple, Any]] = {}  # entry name -> (base key, pipeline)
        self.controlnets: dict[str, Any] = {}
        self.load_errors: dict[str, str] = {}
        self.loads = 0
        self.model_hashes: dict[str, str] = {}
        self.version = renderfleet_version()
        safety = self.catalog.safety
        checker = self._local(self.catalog.get(safety.checker)) if safety.checker else None
        self.finisher = Finisher(safety, checker, device=self.device, action=config.safety_action)

    def __call__(self, batch: pa.Table) -> pa.Table:
        loads_before = self.loads
        rows = self.render_rows(batch.to_pylist())
        if rows:
            rows[0]["model_loads"] = self.loads - loads_before
        results = pa.Table.from_pylist(rows, schema=RESULT_SCHEMA)
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
            except Filtered as e:
                results[i] = self._result(row, status="filtered", filter_reason=e.reason)
                continue
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

    # -- rows ------------------------------------------------------------------------------

    def _prepare(self, index: int, row: dict[str, Any]) -> _Job:
        try:
            entry = self.catalog.pipeline(row.get("model"))
        except UnknownModel as e:
            raise RowError("unknown_model", e.message) from None
        task = row.get("task") or "image"
        if task not in TASKS:
            raise RowError("unknown_task", f"task={task!r}; expected one of {', '.join(TASKS)}")
        if task not in entry.tasks:
            raise RowError("unsupported_task", f"model {entry.name!r} serves {', '.join(entry.tasks)}, not {task!r}")
        # Before anything loads or renders: a blocked prompt never reaches a pipeline.
        rule = self.finisher.blocked_prompt(row.get("prompt"))
        if rule:
            raise Filtered(f"prompt_policy: {rule}")
        pipe = self._stages(entry)[0]
        params = resolve_row(row, entry.defaults, self.config.limits, needs_prompt=takes_prompt(pipe))
        accepted = call_parameters(pipe)
        if not takes_prompt(pipe) and "image" in accepted and not params.image_uri and "class_labels" not in accepted:
            raise RowError("missing_input", f"model {entry.name!r} renders from an input image: the row needs image_uri")
        classes = getattr(getattr(getattr(pipe, "unet", None), "config", None), "num_class_embeds", None)
        if "class_labels" in accepted and classes:
            # Left out, class-conditional families draw labels unseeded: derive one from the seed instead.
            label = params.seed % classes if params.class_label is None else params.class_label
            if not 0 <= label < classes:
                raise RowError("invalid_class_label", f"class_label={label} must be in 0..{classes - 1} for {entry.name!r}")
            params = replace(params, class_label=label)
        if len(params.control_image_uris) != len(entry.controlnets):
            raise RowError("invalid_control_images", f"model {entry.name!r} takes {len(entry.controlnets)} control images "
                                                     f"(control_image_uris), got {len(params.control_image_uris)}")
        width, height = params.width, params.height
        image = None
        if params.image_uri:
            image = self._input_image(params.image_uri, "image_uri")
            if width is None or height is None:
                width, height = edit_size(image.size, self.config.limits.max_pixels)
            image = image.resize((width, height)) if image.size != (width, height) else image
        elif params.task in ("image", "video") and (width is None or height is None):
            native_w, native_h = default_size(pipe)
            width, height = width or native_w, height or native_h
        if width is not None and height is not None:
            check_size(width, height, self.config.limits)
        size = (width, height) if width and height else None
        request = Request(
            seed=params.seed,
            prompt=params.prompt,
            negative_prompt=params.negative_prompt,
            image=image,
            mask_image=self._input_image(params.mask_uri, "mask_uri", mode="L", size=size) if params.mask_uri else None,
            control_images=[self._input_image(u, "control_image_uris", size=size) for u in params.control_image_uris],
            class_label=params.class_label,
        )
        if params.task in ("audio", "mesh"):
            width = height = None
        return _Job(index, entry, params, request, width, height)

    def _resolve_uri(self, uri: str) -> str:
        if is_s3(uri) or os.path.isabs(uri) or not self.config.input_base:
            return uri
        return join(self.config.input_base, uri)

    def _input_image(self, uri: str, column: str, mode: str = "RGB", size: tuple[int, int] | None = None) -> Any:
        limits = self.config.limits
        try:
            data = read_bytes(self._resolve_uri(uri), max_bytes=limits.max_input_bytes)
            return decode_image(data, max_pixels=limits.max_input_pixels, mode=mode, size=size, name=f"{column} {uri}")
        except FileNotFoundError:
            raise RowError("missing_input", f"{column} {uri} does not exist") from None
        except InputError as e:
            raise RowError("invalid_input", str(e)) from None
        except ValueError as e:  # over the byte limit
            raise RowError("invalid_input", f"{column}: {e}") from None

    # -- models ----------------------------------------------------------------------------

    def _local(self, entry: ModelEntry) -> str:
        """A local dir or Hub id for the entry's source (s3:// goes through the node's cache)."""
        if not is_s3(entry.source):
            return entry.source
        cache = self.config.model_cache_dir or str(renderfleet_home() / "models")
        return str(fetch_prefix(entry.source, cache))

    def _stages(self, entry: ModelEntry) -> list[Any]:
        """The entry's pipeline and its cascade's later stages, loading what is missing."""
        return [self._pipeline(entry)] + [self._pipeline(self.catalog.pipeline(n)) for n in entry.stages]

    def _pipeline(self, entry: ModelEntry) -> Any:
        """The loaded pipeline for `entry` (a failure is remembered and fails later rows at once)."""
        if entry.name in self.load_errors:
            raise RowError("model_load_error", self.load_errors[entry.name])
        known = self.pipelines.get(entry.name)
        if known is not None and known[0] in self.bases:
            self.bases.move_to_end(known[0])
            return known[1]
        try:
            key, base = self._base(entry)
            components = {}
            if entry.controlnets:
                nets = [self._controlnet(self.catalog.get(n)) for n in entry.controlnets]
                components["controlnet"] = nets[0] if len(nets) == 1 else nets
            pipe = derive(base, entry.pipeline_class, **components)
        except (ModelLoadError, FileNotFoundError, OSError) as e:
            self.load_errors[entry.name] = f"model {entry.name!r}: {e}"
            raise RowError("model_load_error", self.load_errors[entry.name]) from None
        self.pipelines[entry.name] = (key, pipe)
        return pipe

    def _base(self, entry: ModelEntry) -> tuple[tuple, Any]:
        """The checkpoint under an entry, shared by every entry over the same source."""
        dtype = pick_dtype(entry.dtype, self.device)
        key = (entry.source, entry.revision, str(dtype))
        if key in self.bases:
            self.bases.move_to_end(key)
            return key, self.bases[key]
        started = time.perf_counter()
        base = load_base(self._local(entry), entry.revision, dtype)
        apply_policy(base, entry.policy, self.device)
        size = memory_bytes(base)
        self._evict(size)
        self.bases[key], self.base_bytes[key] = base, size
        self.adapters[key] = AdapterState()
        self.loads += 1
        log.info("loaded %s (%.0f MB) in %.1fs on %s", entry.name, size / 2**20, time.perf_counter() - started, self.device)
        return key, base

    def _evict(self, incoming: int) -> None:
        """Drops least recently used checkpoints until `incoming` fits the memory budget."""
        while self.bases and sum(self.base_bytes.values()) + incoming > self.budget:
            key, _ = self.bases.popitem(last=False)
            self.base_bytes.pop(key)
            self.adapters.pop(key, None)
            for name in [n for n, (k, _) in self.pipelines.items() if k == key]:
                del self.pipelines[name]
            log.info("evicted %s to stay within %.0f MB", key[0], self.budget / 2**20)
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def _controlnet(self, entry: ModelEntry) -> Any:
        if entry.name not in self.controlnets:
            self.controlnets[entry.name] = load_controlnet(
                self._local(entry), entry.revision, pick_dtype(entry.dtype, self.device), self.device
            )
        return self.controlnets[entry.name]

    def _adapter_refs(self, params: RowParams) -> tuple[list[Lora], list[Embedding]]:
        loras = []
        for ref, scale in params.loras:
            entry = self._adapter_entry(ref, "lora")
            name = entry.name if entry else "lora-" + id_hash(ref)[:12]
            loras.append(Lora(name, self._local(entry) if entry else self._adapter_path(ref), scale))
        embeddings = []
        for ref in params.embeddings:
            entry = self._adapter_entry(ref, "embedding")
            name = entry.name if entry else "emb-" + id_hash(ref)[:12]
            embeddings.append(Embedding(name, self._local(entry) if entry else self._adapter_path(ref),
                                        entry.token if entry else None))
        return loras, embeddings

    def _adapter_entry(self, ref: str, kind: str) -> ModelEntry | None:
        try:
            return self.catalog.adapter(ref, kind)
        except UnknownModel as e:
            raise RowError(f"invalid_{kind}", e.message) from None

    def _adapter_path(self, uri: str) -> str:
        uri = self._resolve_uri(uri)
        if is_s3(uri):
            cache = self.config.model_cache_dir or str(renderfleet_home() / "models")
            return str(fetch_prefix(uri, cache))
        if not os.path.exists(uri):
            raise FileNotFoundError(uri)
        return uri

    # -- rendering -------------------------------------------------------------------------

    def _render_group(self, jobs: list[_Job], rows: list[dict[str, Any]]) -> list[tuple[_Job, dict[str, Any]]]:
        """One pipeline call for the group; if it fails, each row alone so one bad row fails alone."""
        first = jobs[0]
        p = first.params
        started = time.perf_counter()
        try:
            stages = self._stages(first.entry)
            key = self.pipelines[first.entry.name][0]
            try:
                loras, embeddings = self._adapter_refs(p)
                self.adapters[key].activate(stages[0], loras, embeddings)
            except RowError:
                raise
            except (FileNotFoundError, OSError, ValueError) as e:
                raise RowError("model_load_error", f"cannot load adapters {p.loras or ''} {p.embeddings or ''}: {e}") from None
            shared = extra_defaults(first.entry)
            shared.update(num_inference_steps=p.num_inference_steps, guidance_scale=p.guidance_scale, width=first.width,
                          height=first.height, strength=p.strength, image_guidance_scale=p.image_guidance_scale,
                          num_frames=p.num_frames, audio_length_in_s=p.audio_length_in_s,
                          controlnet_conditioning_scale=p.controlnet_conditioning_scale)
            later = [self.catalog.pipeline(n) for n in first.entry.stages]
            decoded = render_group(p.task, [(stages[0], shared)] + [(pipe, stage_defaults(e)) for pipe, e in zip(stages[1:], later)],
                                   [j.request for j in jobs])
        except RowError as e:
            return [(j, self._result(rows[j.index], status="failed", error=str(e), job=j)) for j in jobs]
        except Exception as e:  # noqa: BLE001 - a render failure is a row failure, never a job failure
            if len(jobs) > 1:
                return [pair for j in jobs for pair in self._render_group([j], rows)]
            log.exception("render failed for row %r", p.id)
            return [(first, self._result(rows[first.index], status="failed", error=f"render_error: {type(e).__name__}: {e}", job=first))]
        try:
            flags = self.finisher.flags(p.task, decoded)
        except Exception as e:  # noqa: BLE001 - an unchecked output is never written
            log.exception("safety check failed")
            return [(j, self._result(rows[j.index], status="failed", error=f"safety_check_error: {e}", job=j)) for j in jobs]
        share = (time.perf_counter() - started) / len(jobs)
        return [(j, self._write(j, out, flag, rows[j.index], share)) for j, out, flag in zip(jobs, decoded, flags)]

    def _write(self, job: _Job, decoded: Any, flagged: bool | None, row: dict[str, Any], render_s: float) -> dict[str, Any]:
        started = time.perf_counter()
        p = job.params
        width, height = output_size(p.task, decoded)
        try:
            done = self.finisher.finish(p.task, decoded, flagged, p.output_format, p.fps, self._record(job))
            if done.blocked:
                return self._result(row, status="filtered", job=job, filter_reason="nsfw_output", nsfw=True,
                                    safety_action="block", render_s=render_s)
            uri = join(self.config.out, output_key(p.task, p.id, done.ext))
            write_bytes(uri, done.data, content_type=done.content_type)
        except Exception as e:  # noqa: BLE001
            log.exception("cannot finish or write row %r", p.id)
            return self._result(row, status="failed", error=f"write_error: {type(e).__name__}: {e}", job=job)
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
        )

    def _record(self, job: _Job) -> dict[str, str]:
        p = job.params
        return provenance_record(
            version=self.version, model=job.entry.name, model_hash=self._model_hash(job.entry), seed=p.seed,
            steps=p.num_inference_steps, guidance=p.guidance_scale, job_id=self.config.job_id, row_id=p.id,
            prompt=p.prompt, include_prompt=self.catalog.safety.include_prompt,
        )

    def _model_hash(self, entry: ModelEntry) -> str:
        """A content hash of the entry's weights, computed once per actor (cached beside local weights)."""
        if entry.name not in self.model_hashes:
            source = self._local(entry)
            self.model_hashes[entry.name] = (weights_hash(source) if os.path.isdir(source)
                                             else f"hub:{source}@{entry.revision or 'main'}")
        return self.model_hashes[entry.name]

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
