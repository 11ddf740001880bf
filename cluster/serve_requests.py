"""The gateway's request path: a validated body becomes rows (quality, style, adapters and control images
resolved against the catalog), the rows go to their model under the placement guard, and the answer is
OpenAI's response shape with every field filled. A mixin of the Gateway (cluster/serve_app.py)."""

import asyncio
import base64
import binascii
import json
import time
import uuid
from typing import Any

from fastapi import Request

from cluster.api import APIError, GenerationRequest, VideoRequest, parse_size, row_values, usage_fields
from cluster.model_server import call_error, render_all
from pipelines.catalog import ModelEntry
from storage.fs import delete, join, write_bytes
from storage.reasons import RowError

_DATA_URL_PREFIX = "data:"


class RequestRoutes:
    """Turns requests into rows and rows into answers (the Gateway provides config, catalog, models, metrics)."""

    config: Any
    catalog: Any
    models: dict[str, Any]
    metrics: dict[str, Any]
    placement: Any
    keys: Any

    def _entry(self, name: str | None, task: str, key: str = "") -> ModelEntry:
        try:
            entry = self.catalog.pipeline(name or self._default_for(task))
        except KeyError:
            entry = None
        if entry is None or entry.name not in self.models:
            raise APIError(404, f"model {name!r} is not served here; GET /v1/models lists them", param="model",
                           code="model_not_found")
        if not self.keys.allows(key, entry.name):
            raise APIError(403, f"this API key may not use model {entry.name!r}", param="model", code="model_not_allowed")
        if task not in entry.tasks:
            raise APIError(400, f"model {entry.name!r} serves {', '.join(entry.tasks)}, not {task}", param="model",
                           code="unsupported_task")
        return entry

    def _default_for(self, task: str) -> str:
        default = self.catalog.get(None)
        if task in default.tasks and default.name in self.models:
            return default.name
        for entry in self.catalog.models.values():
            if entry.kind == "pipeline" and task in entry.tasks and not entry.stages and entry.name in self.models:
                return entry.name
        raise APIError(404, f"no model served here renders {task}", param="model", code="model_not_found")

    @staticmethod
    def form_json(name: str, value: str) -> Any:
        """A multipart field that carries JSON (loras, embeddings, control_images); a bare string is one item."""
        try:
            return json.loads(value)
        except ValueError:
            if name == "loras":
                raise APIError(400, f"{name}: expected JSON such as [{{\"name\": \"...\", \"scale\": 0.8}}]",
                               param=name, code="invalid_lora") from None
            return [value]

    async def generate(self, request: Request, key: str, route: str, task: str, body: GenerationRequest,
                       files: dict[str, list[Any]] | None = None) -> Any:
        """One generation request: answered when rendered, or at once as an async job when it asks for one."""
        entry = self._entry(body.model, task, key)
        as_job = body.job or "respond-async" in request.headers.get("prefer", "").lower()
        await self.keys.admit(key, self.metrics)  # 429 past the key's requests per minute
        rows, stored, quality = await self.prepare(entry, task, body, files or {})
        try:
            if as_job:
                return await self.create_job(key, task, entry, body, rows, stored, quality)
            return await self.answer(route, entry, task, body, rows, stored, quality)
        finally:
            if not as_job:
                for uri in stored:
                    await asyncio.to_thread(delete, uri)

    async def answer(self, route: str, entry: ModelEntry, task: str, body: GenerationRequest, rows: list[dict],
                     stored: dict[str, str], quality: str | None) -> dict:
        # b64_json is answered from the replica's bytes, and the gateway stores them after answering;
        # a url must resolve when the client gets it, so the replica stores those before answering.
        caller_writes = body.response_format == "b64_json"
        results = await self.run_rows(route, entry, rows, caller_writes, stored)
        data = []
        for r in results:
            self.metrics["outputs"].labels(entry.name, task).inc()
            data.append(self._item(r, body.response_format, body.prompt))
        self.metrics["requests"].labels(entry.name, route, "200").inc()
        await self.output_writes.submit(results)
        return {"created": int(time.time()), "data": data, **usage_fields(results, rows[0]["output_format"], quality)}

    async def prepare(self, entry: ModelEntry, task: str, body: GenerationRequest, files: dict[str, list[Any]]
                      ) -> tuple[list[dict], dict[str, str], str | None]:
        """The request's rows, the uploads stored for them (uri -> field) and the quality used. Uploads are deleted
        here if preparing fails; otherwise the caller owns them."""
        stored: dict[str, str] = {}
        try:
            extra = self._resolved(entry, body)
            width, height = parse_size(getattr(body, "size", None), self.config.limits)
            if width is not None:
                extra.update(width=width, height=height)
            for name in ("image", "mask"):
                upload = (files.get(name) or [None])[0]
                if upload is not None and hasattr(upload, "read"):
                    extra[f"{name}_uri"] = await self._store(name, await upload.read(), stored)
            controls = [await u.read() for u in files.get("control_image", []) if hasattr(u, "read")]
            controls += [self._data_url(i, url) for i, url in enumerate(getattr(body, "control_images", None) or [])]
            if controls:
                extra["control_image_uris"] = [await self._store("control_image", c, stored) for c in controls]
        except RowError as e:
            await self._discard(stored)
            raise APIError(400, str(e), param=None, code=e.code) from None
        except BaseException:
            await self._discard(stored)
            raise
        quality = extra.pop("_quality", None)
        request_id = uuid.uuid4().hex
        rows = []
        for i in range(body.n):
            row = {"id": f"{request_id}-{i}", "task": task, "model": entry.name, "prompt": body.prompt,
                   "negative_prompt": body.negative_prompt, "output_format": body.output_format,
                   **row_values(body), **extra}
            if body.seed is not None:
                row["seed"] = body.seed + i
            rows.append(row)
        return rows, stored, quality

    def _resolved(self, entry: ModelEntry, body: GenerationRequest) -> dict[str, Any]:
        """quality -> steps and style -> prompt text from the model's catalog `serve:`, adapters by catalog name."""
        s, extra = entry.serve, {}
        quality = body.quality if body.quality not in (None, "auto") else None
        if quality is not None:
            if quality not in s.quality:
                known = ", ".join(["auto", *s.quality])
                raise APIError(400, f"quality {quality!r} is not offered by model {entry.name!r} (offered: {known})",
                               param="quality", code="unsupported_quality")
            if body.num_inference_steps is None:
                extra["num_inference_steps"] = s.quality[quality]
        extra["_quality"] = body.quality or "auto"
        if body.style is not None:
            if body.style not in s.styles:
                known = ", ".join(s.styles) or "none"
                raise APIError(400, f"style {body.style!r} is not offered by model {entry.name!r} (offered: {known})",
                               param="style", code="unsupported_style")
            extra["prompt"] = f"{body.prompt}{s.styles[body.style]}"
        for kind, refs in (("lora", [r.name for r in body.loras or []]), ("embedding", body.embeddings or [])):
            for ref in refs:
                found = self.catalog.models.get(ref)
                if found is None or found.kind != kind:
                    names = [n for n, m in self.catalog.models.items() if m.kind == kind] or ["none"]
                    raise APIError(400, f"{kind} {ref!r} is not a catalog {kind} (online requests name catalog "
                                        f"entries: {', '.join(names)})", param=f"{kind}s", code=f"invalid_{kind}")
        if body.loras:
            extra["loras"] = [{"uri": r.name, "scale": r.scale} for r in body.loras]
        if body.embeddings:
            extra["embeddings"] = list(body.embeddings)
        if isinstance(body, VideoRequest) and body.seconds is not None and body.num_frames is None:
            extra["num_frames"] = body.frames_for_seconds()
        return extra

    def _data_url(self, index: int, url: str) -> bytes:
        """A control image given as a data URL (data:image/png;base64,...)."""
        head, sep, payload = url.partition(",")
        if not (url.startswith(_DATA_URL_PREFIX) and sep and head.endswith(";base64")):
            raise APIError(400, f"control_images[{index}]: expected a data:image/...;base64,... URL", param="control_images",
                           code="invalid_input")
        try:
            return base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            raise APIError(400, f"control_images[{index}]: not valid base64", param="control_images",
                           code="invalid_input") from None

    async def _store(self, name: str, data: bytes, stored: dict[str, str]) -> str:
        """Writes one upload under the store's uploads/ folder (which renderers may read) and returns its uri."""
        if len(data) > self.config.max_upload_bytes:
            raise APIError(413, f"{name}: {len(data)} bytes is over the {self.config.max_upload_bytes}-byte "
                                "upload limit", param=name, code="file_too_large")
        uri = join(self.config.store, "uploads", f"{uuid.uuid4().hex}.{name}")
        stored[uri] = name
        await asyncio.to_thread(write_bytes, uri, data)
        return uri

    @staticmethod
    async def _discard(stored: dict[str, str]) -> None:
        for uri in stored:
            await asyncio.to_thread(delete, uri)

    async def run_rows(self, route: str, entry: ModelEntry, rows: list[dict], caller_writes: bool,
                       uploads: dict[str, str] | None = None) -> list[dict]:
        """Every row rendered by the model (under the placement guard), or the request's error; with
        caller_writes the outputs come back unstored, with their bytes, for the gateway to store."""
        handle = self.models[entry.name]
        depth = self.metrics["queue_depth"].labels(entry.name)
        depth.inc(len(rows))
        started = time.perf_counter()
        try:
            results, failure = await self.placement.guard(
                entry.name, render_all([handle.render.remote(r, caller_writes) for r in rows]))
        except APIError as e:
            self.metrics["refused"].labels(str(e.status), e.code or "").inc()
            self.metrics["requests"].labels(entry.name, route, str(e.status)).inc()
            raise
        finally:
            depth.dec(len(rows))
        if failure is not None:
            if isinstance(failure, dict) and failure["status"] == "filtered":
                self.metrics["filtered"].labels(entry.name, (failure.get("filter_reason") or "").split(":")[0]).inc()
            error = call_error(entry.name, failure, uploads)
            if error.status in (429, 503):
                self.metrics["refused"].labels(str(error.status), error.code or "").inc()
            self.metrics["requests"].labels(entry.name, route, str(error.status)).inc()
            raise error
        waited = time.perf_counter() - started
        self.metrics["batch"].labels(entry.name).observe(max(r.get("batch_size", 1) for r in results))
        self.metrics["render_s"].labels(entry.name).observe(max(r.get("batch_s", 0.0) for r in results))
        self.metrics["queue_s"].labels(entry.name).observe(max(0.0, waited - max(r.get("batch_s", 0.0) for r in results)))
        return results
