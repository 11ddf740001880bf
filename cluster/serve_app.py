"""The online endpoint: the batch job's Renderer behind an OpenAI-compatible API on Ray Serve.

One deployment per catalog pipeline (`cluster/model_server.py`: each with its own autoscaling,
batching and backpressure from the catalog's `serve` settings) behind one FastAPI ingress, the
Gateway here. Requests that share size, steps and guidance inside a batch run in one pipeline
call, exactly as in batch jobs, because the replica hands the whole batch to `Renderer.render_rows`.
The gateway admits as many requests as the models can hold; what they cannot take gets a 503 at once.
"""


import asyncio
import base64
import hmac
import logging
import secrets
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError
from ray import serve
from ray.serve.config import BackpressureConfig
from starlette.exceptions import HTTPException as StarletteHTTPException

from cluster.api import (
    ERROR_RESPONSES,
    GENERATION_ROUTE,
    APIError,
    AudioGenerationRequest,
    GenerationRequest,
    ImageEditRequest,
    ImageGenerationRequest,
    MeshGenerationRequest,
    VideoGenerationRequest,
    body_bytes,
    bounded_openapi,
    documented,
    documented_form,
    form_limit,
    http_error,
    invalid,
    parse_size,
    refuse_declared,
    row_values,
)
from cluster.links import make_token, read_token
from cluster.model_server import RETRY_AFTER_S, ModelServer, call_error, render_all
from cluster.renderer import RendererConfig
from pipelines.catalog import Catalog, ModelEntry
from pipelines.media.formats import FORMATS, format_for_path
from storage.fs import delete, is_s3, join, read_bytes, s3_client, split_s3, write_bytes
from storage.params import Limits

log = logging.getLogger(__name__)

GATEWAY_HEADROOM = 16  # gateway slots beyond the models' capacity: health, metrics, links, requests refused early


@dataclass(frozen=True)
class ServeConfig:
    """What the endpoint needs; plain data for every replica."""

    catalog_path: str
    store: str  # where outputs go: a local dir or s3://bucket/prefix
    public_url: str = "http://127.0.0.1:8000"  # how clients reach this app, for local-store links
    api_keys: tuple[str, ...] = ()
    url_secret: str = field(default_factory=lambda: secrets.token_hex(32))
    url_ttl_s: int = 3600
    max_upload_bytes: int = 20 * 1024 * 1024
    limits: Limits = field(default_factory=Limits)
    torch_threads: int | None = 1
    replica_cpus: float = 0.25
    env: dict[str, str] = field(default_factory=dict)


def _metrics():
    """Our Prometheus metrics, one registry per gateway replica."""
    from prometheus_client import CollectorRegistry, Counter, Histogram

    registry = CollectorRegistry()
    return registry, {
        "requests": Counter("renderfleet_requests", "HTTP requests by model and status", ["model", "route", "status"], registry=registry),
        "outputs": Counter("renderfleet_outputs", "outputs rendered by model and task", ["model", "task"], registry=registry),
        "filtered": Counter("renderfleet_filtered", "filtered prompts and outputs by reason", ["model", "reason"], registry=registry),
        "render_s": Histogram("renderfleet_render_seconds", "model-side seconds per batch", ["model"], registry=registry),
        "batch": Histogram("renderfleet_batch_size", "rows per model call batch", ["model"],
                           buckets=(1, 2, 3, 4, 6, 8, 12, 16, 32), registry=registry),
    }


app = FastAPI(title="renderfleet", docs_url=None, redoc_url=None, openapi_url=None,  # /openapi.json is a keyed route
              responses=ERROR_RESPONSES)


@app.exception_handler(APIError)
async def _api_error(_: Request, e: APIError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


@app.exception_handler(RequestValidationError)
async def _validation_error(_: Request, e: RequestValidationError) -> JSONResponse:
    return JSONResponse(invalid(e.errors()).body(), status_code=400)


@app.exception_handler(StarletteHTTPException)
async def _http_error(_: Request, e: StarletteHTTPException) -> JSONResponse:
    """Unknown routes, wrong methods and unparseable multipart bodies, in our error shape."""
    error = http_error(e.status_code, e.detail)
    return JSONResponse(error.body(), status_code=error.status, headers=e.headers)


@app.exception_handler(Exception)
async def _unexpected(_: Request, e: Exception) -> JSONResponse:
    log.exception("unexpected error")
    error = APIError(500, f"internal error ({type(e).__name__})", type_="server_error", code="internal_error")
    return JSONResponse(error.body(), status_code=500)


# Serve pickles the class when it is decorated: everything it uses must be defined (or imported) above.
@serve.deployment(ray_actor_options={"num_cpus": 0})
@serve.ingress(app)
class Gateway:
    """The one HTTP entry point: keys, validation at the boundary, a request's rows fanned out to its model,
    OpenAI-shaped answers and errors."""

    def __init__(self, config: ServeConfig, models: dict[str, Any]):
        self.config = config
        self.catalog = Catalog.load(config.catalog_path)
        self.models = models
        self.registry, self.metrics = _metrics()

    # -- plumbing --------------------------------------------------------------------------

    def _auth(self, request: Request) -> None:
        if not self.config.api_keys:
            return
        header = request.headers.get("authorization", "")
        key = header[7:] if header.lower().startswith("bearer ") else ""
        if not any(hmac.compare_digest(key.encode("utf-8", "replace"), k.encode()) for k in self.config.api_keys):
            raise APIError(401, "missing or invalid API key (Authorization: Bearer ...)", type_="authentication_error",
                           code="invalid_api_key")

    def _entry(self, name: str | None, task: str) -> ModelEntry:
        try:
            entry = self.catalog.pipeline(name or self._default_for(task))
        except KeyError:
            entry = None
        if entry is None or entry.name not in self.models:
            raise APIError(404, f"model {name!r} is not served here; GET /v1/models lists them", param="model",
                           code="model_not_found")
        if task not in entry.tasks:
            raise APIError(400, f"model {entry.name!r} serves {', '.join(entry.tasks)}, not {task}", param="model",
                           code="unsupported_task")
        return entry

    async def _body(self, request: Request, model: type[GenerationRequest]) -> Any:
        """The JSON body validated once, against this deployment's limits."""
        raw = await body_bytes(request)
        try:
            return model.model_validate_json(raw or b"{}", context={"limits": self.config.limits})
        except ValidationError as e:
            raise invalid(e.errors()) from None

    def _validated(self, model: type[GenerationRequest], fields: dict[str, Any]) -> Any:
        try:
            return model.model_validate(fields, context={"limits": self.config.limits})
        except ValidationError as e:
            raise invalid(e.errors()) from None

    def _default_for(self, task: str) -> str:
        default = self.catalog.get(None)
        if task in default.tasks and default.name in self.models:
            return default.name
        for entry in self.catalog.models.values():
            if entry.kind == "pipeline" and task in entry.tasks and not entry.stages and entry.name in self.models:
                return entry.name
        raise APIError(404, f"no model served here renders {task}", param="model", code="model_not_found")

    async def _render(self, route: str, entry: ModelEntry, task: str, body: Any, extra: dict[str, Any],
                      uploads: dict[str, str] | None = None) -> dict:
        rows = []
        request_id = uuid.uuid4().hex
        for i in range(body.n):
            row = {"id": f"{request_id}-{i}", "task": task, "model": entry.name, "prompt": body.prompt,
                   "negative_prompt": body.negative_prompt, "output_format": body.output_format, **row_values(body), **extra}
            if body.seed is not None:
                row["seed"] = body.seed + i
            rows.append(row)
        handle = self.models[entry.name]
        results, failure = await render_all([handle.render.remote(r) for r in rows])
        if failure is not None:
            if isinstance(failure, dict) and failure["status"] == "filtered":
                self.metrics["filtered"].labels(entry.name, (failure.get("filter_reason") or "").split(":")[0]).inc()
            error = call_error(entry.name, failure, uploads)
            self.metrics["requests"].labels(entry.name, route, str(error.status)).inc()
            raise error
        self.metrics["batch"].labels(entry.name).observe(max(r.get("batch_size", 1) for r in results))
        self.metrics["render_s"].labels(entry.name).observe(max(r.get("batch_s", 0.0) for r in results))
        data = []
        for r in results:
            self.metrics["outputs"].labels(entry.name, task).inc()
            data.append(self._item(r, body.response_format, body.prompt))
        self.metrics["requests"].labels(entry.name, route, "200").inc()
        return {"created": int(time.time()), "data": data}

    def _item(self, result: dict, response_format: str, prompt: str) -> dict:
        uri = result["output_uri"]
        if response_format == "b64_json":
            return {"b64_json": base64.b64encode(read_bytes(uri)).decode(), "revised_prompt": prompt}
        if is_s3(uri):
            bucket, key = split_s3(uri)
            url = s3_client().generate_presigned_url("get_object", Params={"Bucket": bucket, "Key": key},
                                                     ExpiresIn=self.config.url_ttl_s)
        else:
            url = f"{self.config.public_url.rstrip('/')}/v1/files/{make_token(self.config.url_secret, uri, self.config.url_ttl_s)}"
        return {"url": url, "revised_prompt": prompt}

    # -- routes ----------------------------------------------------------------------------

    @app.get("/healthz")
    async def healthz(self) -> dict:
        return {"status": "ok"}

    @app.get("/metrics", response_class=Response, responses={200: {"content": {"text/plain": {}}}})
    async def metrics(self, request: Request) -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        self._auth(request)
        return Response(generate_latest(self.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/openapi.json", include_in_schema=False)
    async def openapi(self, request: Request) -> JSONResponse:
        self._auth(request)
        return JSONResponse(bounded_openapi(app.openapi(), self.config.limits))

    @app.get("/v1/models")
    async def list_models(self, request: Request) -> dict:
        self._auth(request)
        return {"object": "list", "data": [
            {"id": m.name, "object": "model", "owned_by": "renderfleet", "tasks": list(m.tasks)}
            for m in self.catalog.models.values() if m.kind == "pipeline" and m.name in self.models]}

    @app.get("/v1/files/{token}", response_class=Response,
             responses={200: {"description": "The stored output", "content": {f.mime: {} for f in FORMATS.values()}}})
    async def file(self, token: str) -> Response:
        uri = read_token(self.config.url_secret, token)
        try:
            data = await asyncio.to_thread(read_bytes, uri)
        except FileNotFoundError:
            raise APIError(404, "the file behind this link no longer exists", code="file_not_found") from None
        fmt = format_for_path(uri)
        return Response(data, media_type=fmt.mime if fmt else "application/octet-stream")

    @app.post("/v1/images/generations", openapi_extra=documented(ImageGenerationRequest), **GENERATION_ROUTE)
    async def images(self, request: Request) -> dict:
        self._auth(request)
        body = await self._body(request, ImageGenerationRequest)
        entry = self._entry(body.model, "image")
        width, height = parse_size(body.size, self.config.limits)
        return await self._render("images", entry, "image", body, {"width": width, "height": height})

    @app.post("/v1/videos/generations", openapi_extra=documented(VideoGenerationRequest), **GENERATION_ROUTE)
    async def videos(self, request: Request) -> dict:
        self._auth(request)
        body = await self._body(request, VideoGenerationRequest)
        entry = self._entry(body.model, "video")
        width, height = parse_size(body.size, self.config.limits)
        return await self._render("videos", entry, "video", body, {"width": width, "height": height})

    @app.post("/v1/audio/generations", openapi_extra=documented(AudioGenerationRequest), **GENERATION_ROUTE)
    async def audio(self, request: Request) -> dict:
        self._auth(request)
        body = await self._body(request, AudioGenerationRequest)
        entry = self._entry(body.model, "audio")
        return await self._render("audio", entry, "audio", body, {})

    @app.post("/v1/meshes/generations", openapi_extra=documented(MeshGenerationRequest), **GENERATION_ROUTE)
    async def meshes(self, request: Request) -> dict:
        self._auth(request)
        body = await self._body(request, MeshGenerationRequest)
        entry = self._entry(body.model, "mesh")
        return await self._render("meshes", entry, "mesh", body, {})

    @app.post("/v1/images/edits", openapi_extra=documented_form(ImageEditRequest), **GENERATION_ROUTE)
    async def edits(self, request: Request) -> dict:
        self._auth(request)
        refuse_declared(request, form_limit(self.config.max_upload_bytes), "an image, a mask and fields")
        form = await request.form(max_files=4, max_fields=64, max_part_size=self.config.max_upload_bytes)
        uploads = [v for k, v in form.multi_items() if k in ("image", "image[]") and hasattr(v, "read")]
        if not uploads:
            raise APIError(400, "image: a file is required (multipart field 'image' or 'image[]')", param="image",
                           code="missing_input")
        fields = {k: v for k, v in form.items() if not hasattr(v, "read")}
        body = self._validated(ImageEditRequest, fields)
        entry = self._entry(body.model or self._edit_default(), "edit")
        width, height = parse_size(body.size, self.config.limits)
        extra: dict[str, Any] = {"width": width, "height": height}
        stored: dict[str, str] = {}  # upload uri -> its form field, deleted when the request is done
        try:
            for name, upload in (("image", uploads[0]), ("mask", form.get("mask"))):
                if upload is None or not hasattr(upload, "read"):
                    continue
                data = await upload.read()
                if len(data) > self.config.max_upload_bytes:
                    raise APIError(413, f"{name}: {len(data)} bytes is over the {self.config.max_upload_bytes}-byte "
                                        "upload limit", param=name, code="file_too_large")
                uri = join(self.config.store, "uploads", f"{uuid.uuid4().hex}.{name}")
                stored[uri] = name
                await asyncio.to_thread(write_bytes, uri, data)
                extra[f"{name}_uri"] = uri
            return await self._render("edits", entry, "edit", body, extra, uploads=stored)
        finally:
            for uri in stored:
                await asyncio.to_thread(delete, uri)

    def _edit_default(self) -> str:
        return self._default_for("edit")


def build_app(config: ServeConfig, model_names: list[str] | None = None) -> Any:
    """The Serve application: one ModelServer per catalog pipeline (or the named ones) behind the Gateway."""
    import torch

    catalog = Catalog.load(config.catalog_path)
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    models = {}
    capacity = 0  # rows the models can hold at once (running + queued): the gateway admits no more requests
    for entry in catalog.models.values():
        if entry.kind != "pipeline" or (model_names is not None and entry.name not in model_names):
            continue
        s = entry.serve
        renderer = RendererConfig(catalog_path=config.catalog_path, out=config.store, limits=config.limits,
                                  input_roots=(join(config.store, "uploads"),), write_deadline_s=10.0,
                                  torch_threads=config.torch_threads, env=config.env, job_id="serve")
        autoscaling = None
        if s.max_replicas > 1 or s.min_replicas != 1:
            autoscaling = {"min_replicas": s.min_replicas, "max_replicas": s.max_replicas, "initial_replicas": s.min_replicas,
                           "target_ongoing_requests": s.target_ongoing_requests, "upscale_delay_s": s.upscale_delay_s,
                           "downscale_delay_s": s.downscale_delay_s, "metrics_interval_s": 0.5, "look_back_period_s": 2.0}
        options: dict[str, Any] = {
            "name": f"model-{entry.name}",
            "max_ongoing_requests": s.max_ongoing_requests,
            "max_queued_requests": s.max_queued_requests,
            "ray_actor_options": {"num_cpus": config.replica_cpus, "num_gpus": s.num_gpus if gpus else 0},
        }
        if autoscaling:
            options["autoscaling_config"] = autoscaling
        else:
            options["num_replicas"] = 1
        models[entry.name] = ModelServer.options(**options).bind(renderer, s.max_batch_size, s.batch_wait_timeout_s)
        capacity += s.max_replicas * s.max_ongoing_requests + max(s.max_queued_requests, 0)
    # The gateway admits as many requests as the models can hold, so the models' own limits decide: what they
    # cannot take fails fast at the model handle, as an OpenAI-shaped 503 from the gateway. Its queue is as deep,
    # because Serve counts a burst's requests as queued while it picks a replica for them (measured: a queue of
    # 16 refused 18 of 64 simultaneous requests that fit); past both, the proxy refuses with a plain-text 503.
    slots = capacity + GATEWAY_HEADROOM
    gateway = Gateway.options(max_ongoing_requests=slots, max_queued_requests=slots,
                              backpressure_config=BackpressureConfig(retry_after_s=RETRY_AFTER_S))
    return gateway.bind(config, models)


def load_api_keys(path: str | None) -> tuple[str, ...]:
    """API keys from a file (one per line) and $RENDERFLEET_API_KEYS (comma-separated)."""
    import os

    keys = [k.strip() for k in os.environ.get("RENDERFLEET_API_KEYS", "").split(",")]
    if path:
        with open(path, encoding="utf-8") as f:
            keys += [line.strip() for line in f if line.strip() and not line.startswith("#")]
    return tuple(k for k in keys if k)


def app_builder(args: dict[str, str]) -> Any:
    """Entry point for `serve deploy` / RayService configs: `import_path: cluster.serve_app:app_builder`.

    args: catalog (required), store (required), public_url, api_keys_file, url_ttl_s.
    """
    from cluster.renderer import storage_env

    missing = [k for k in ("catalog", "store") if not args.get(k)]
    if missing:
        raise ValueError(f"renderfleet serve app needs args: {', '.join(missing)}")
    config = ServeConfig(
        catalog_path=args["catalog"],
        store=args["store"],
        public_url=args.get("public_url", "http://127.0.0.1:8000"),
        api_keys=load_api_keys(args.get("api_keys_file")),
        url_secret=args.get("url_secret") or secrets.token_hex(32),
        url_ttl_s=int(args.get("url_ttl_s", 3600)),
        env=storage_env(),
    )
    return build_app(config)
