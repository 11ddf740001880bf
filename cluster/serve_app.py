"""The online endpoint: the batch job's Renderer behind an OpenAI-compatible API on Ray Serve.

One deployment per served catalog pipeline (`cluster/model_server.py`: each with its own autoscaling,
batching and backpressure from the catalog's `serve` settings) behind one FastAPI ingress, the
Gateway here; its async job routes live in `cluster/serve_jobs.py`, its app and metrics in
`cluster/gateway_http.py`. Requests that share a model, size and call parameters (adapters included)
inside a batch run in one pipeline call, because the replica hands the whole batch to `Renderer.render_rows`.
The gateway admits as many requests as the models can hold; what they cannot take gets a 503 at once, and
a model whose replica cannot be placed answers 503 within the placement timeout (`cluster/placement.py`).
"""


import asyncio
import base64
import hmac
import logging
import secrets
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError
from ray import serve
from ray.serve.config import BackpressureConfig

from cluster.api import (
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
    invalid,
    refuse_declared,
)
from cluster.gateway_http import app, gateway_metrics
from cluster.links import make_token, read_token
from cluster.model_server import RETRY_AFTER_S, ModelServer
from cluster.output_writes import OutputWrites
from cluster.renderer_config import RendererConfig
from cluster.resources import thread_env
from cluster.serve_jobs import JobRoutes
from cluster.serve_requests import RequestRoutes
from pipelines.catalog import Catalog
from pipelines.media.formats import FORMATS, format_for_path
from storage.fs import is_s3, join, read_bytes, s3_client, split_s3
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
    placement_timeout_s: float = 60.0  # a model no node can hold a replica of answers 503 model_unplaceable after this
    load_timeout_s: float = 600.0  # a replica a node can hold gets this long to start (placed, checkpoint loaded)
    job_retention_s: float = 24 * 3600.0  # finished async jobs (records, outputs, uploads) are deleted after this
    job_lease_s: float = 30.0  # a queued/in-progress job whose runner has not written for this long is taken over
    job_attempts: int = 3  # runs of one job (the first plus takeovers) before it is marked failed
    api_keys_file: str | None = None  # re-read when it changes: keys, per-key limits and models (cluster/limits.py)
    gateway_replicas: int = 1  # HTTP gateway replicas; per-key rates are counted across all of them


# Serve pickles the class when it is decorated: everything it uses must be defined (or imported) above.
@serve.deployment(ray_actor_options={"num_cpus": 0})
@serve.ingress(app)
class Gateway(RequestRoutes, JobRoutes):
    """The one HTTP entry point: keys, validation at the boundary, a request's rows fanned out to its model,
    OpenAI-shaped answers and errors; sync routes in RequestRoutes, async jobs in JobRoutes."""

    def __init__(self, config: ServeConfig, models: dict[str, Any], needs: dict[str, dict[str, float]] | None = None):
        from cluster.limits import KeyLimits
        from cluster.placement import Placement

        self.config = config
        self.catalog = Catalog.load(config.catalog_path)
        self.models = models
        self.registry, self.metrics = gateway_metrics()
        self.output_writes = OutputWrites(self.metrics["output_writes"])
        app_name = serve.get_replica_context().app_name
        self.placement = Placement(app_name, needs or {}, config.placement_timeout_s,
                                   load_timeout_s=config.load_timeout_s)
        self.keys = KeyLimits(config.api_keys, config.api_keys_file, app_name=app_name)  # rates shared by the app's replicas
        self.start_jobs()

    # -- plumbing --------------------------------------------------------------------------

    def _auth(self, request: Request) -> str:
        """The request's API key ("" when the server has none); 401 for a missing or wrong one."""
        if not self.keys.enabled():
            return ""
        header = request.headers.get("authorization", "")
        key = header[7:] if header.lower().startswith("bearer ") else ""
        if not any(hmac.compare_digest(key.encode("utf-8", "replace"), k.encode()) for k in self.keys.keys()):
            raise APIError(401, "missing or invalid API key (Authorization: Bearer ...)", type_="authentication_error",
                           code="invalid_api_key")
        return key

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

    def _item(self, result: dict, response_format: str, prompt: str) -> dict:
        uri = result["output_uri"]
        if response_format == "b64_json":
            return {"b64_json": base64.b64encode(result["data"]).decode(), "revised_prompt": prompt}  # no read-back
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
        await self.count_jobs()
        return Response(generate_latest(self.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/openapi.json", include_in_schema=False)
    async def openapi(self, request: Request) -> JSONResponse:
        self._auth(request)
        return JSONResponse(bounded_openapi(app.openapi(), self.config.limits))

    @app.get("/v1/models")
    async def list_models(self, request: Request) -> dict:
        key = self._auth(request)
        states = {m: await self.placement.state(m, fresh=False) for m in self.models}
        return {"object": "list", "data": [
            {"id": m.name, "object": "model", "owned_by": "renderfleet", "tasks": list(m.tasks),
             "replicas": states[m.name].running if states[m.name] else None}
            for m in self.catalog.models.values()
            if m.kind == "pipeline" and m.name in self.models and self.keys.allows(key, m.name)]}

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
    async def images(self, request: Request) -> Any:
        key = self._auth(request)
        return await self.generate(request, key, "images", "image", await self._body(request, ImageGenerationRequest))

    @app.post("/v1/videos/generations", openapi_extra=documented(VideoGenerationRequest), **GENERATION_ROUTE)
    async def videos(self, request: Request) -> Any:
        key = self._auth(request)
        return await self.generate(request, key, "videos", "video", await self._body(request, VideoGenerationRequest))

    @app.post("/v1/audio/generations", openapi_extra=documented(AudioGenerationRequest), **GENERATION_ROUTE)
    async def audio(self, request: Request) -> Any:
        key = self._auth(request)
        return await self.generate(request, key, "audio", "audio", await self._body(request, AudioGenerationRequest))

    @app.post("/v1/meshes/generations", openapi_extra=documented(MeshGenerationRequest), **GENERATION_ROUTE)
    async def meshes(self, request: Request) -> Any:
        key = self._auth(request)
        return await self.generate(request, key, "meshes", "mesh", await self._body(request, MeshGenerationRequest))

    @app.post("/v1/images/edits", openapi_extra=documented_form(ImageEditRequest), **GENERATION_ROUTE)
    async def edits(self, request: Request) -> Any:
        key = self._auth(request)
        refuse_declared(request, form_limit(self.config.max_upload_bytes), "an image, a mask and fields")
        form = await request.form(max_files=12, max_fields=64, max_part_size=self.config.max_upload_bytes)
        uploads = [v for k, v in form.multi_items() if k in ("image", "image[]") and hasattr(v, "read")]
        if not uploads:
            raise APIError(400, "image: a file is required (multipart field 'image' or 'image[]')", param="image",
                           code="missing_input")
        fields: dict[str, Any] = {k: v for k, v in form.items() if not hasattr(v, "read")}
        for name in ("loras", "embeddings", "control_images"):  # JSON-valued form fields
            if isinstance(fields.get(name), str):
                fields[name] = self.form_json(name, fields[name])
        body = self._validated(ImageEditRequest, fields)
        files = {"image": [uploads[0]], "mask": [form.get("mask")],
                 "control_image": [v for k, v in form.multi_items() if k in ("control_image", "control_image[]")]}
        return await self.generate(request, key, "edits", "edit", body, files)


def served_models(catalog: Catalog, names: list[str] | None = None) -> list[str]:
    """The pipelines to serve: `names` (checked), else the default model and those whose `serve: {enabled: true}`."""
    pipelines = [n for n, m in catalog.models.items() if m.kind == "pipeline"]
    if names is None:
        return [n for n in pipelines if n == catalog.default_model or catalog.models[n].serve.enabled]
    if names == ["all"]:
        return pipelines
    unknown = [n for n in names if n not in pipelines]
    if unknown:
        raise ValueError(f"not pipelines of the catalog: {', '.join(unknown)}; known: {', '.join(pipelines)}")
    return list(dict.fromkeys(names))


def build_app(config: ServeConfig, model_names: list[str] | None = None) -> Any:
    """The Serve application: one ModelServer per catalog pipeline (or the named ones) behind the Gateway."""
    import torch

    catalog = Catalog.load(config.catalog_path)
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    models, needs = {}, {}
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
        resources: dict[str, Any] = {"num_cpus": s.num_cpus or config.replica_cpus, "num_gpus": s.num_gpus if gpus else 0}
        if s.resources:  # custom resources (accelerator_a100: 1): only nodes that have them take a replica
            resources["resources"] = {k: float(v) for k, v in s.resources.items()}
        resources.update(thread_env(config.torch_threads))  # batches render in Serve's threads: OpenMP's count
        needs[entry.name] = {"CPU": resources["num_cpus"], "GPU": resources["num_gpus"], **resources.get("resources", {})}
        options: dict[str, Any] = {
            "name": f"model-{entry.name}",
            "max_ongoing_requests": s.max_ongoing_requests,
            "max_queued_requests": s.max_queued_requests,
            "ray_actor_options": resources,
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
    gateway = Gateway.options(num_replicas=config.gateway_replicas, max_ongoing_requests=slots, max_queued_requests=slots,
                              backpressure_config=BackpressureConfig(retry_after_s=RETRY_AFTER_S))
    return gateway.bind(config, models, needs)


def load_api_keys(path: str | None) -> tuple[str, ...]:
    """API keys from a file (one per line, or the YAML of cluster/limits.py) and $RENDERFLEET_API_KEYS (comma-separated)."""
    import os

    from cluster.limits import read_keys_file

    keys = [k.strip() for k in os.environ.get("RENDERFLEET_API_KEYS", "").split(",")]
    if path:
        keys += list(read_keys_file(path))
    return tuple(k for k in keys if k)


def app_builder(args: dict[str, str]) -> Any:
    """Entry point for `serve deploy` / RayService configs: `import_path: cluster.serve_app:app_builder`.

    args: catalog (required), store (required), models (comma-separated, or all; default: the default model and
    those with `serve: {enabled: true}`), public_url, api_keys_file, url_ttl_s, placement_timeout_s, load_timeout_s, job_retention_s,
    gateway_replicas.
    """
    from cluster.renderer_config import storage_env

    missing = [k for k in ("catalog", "store") if not args.get(k)]
    if missing:
        raise ValueError(f"renderfleet serve app needs args: {', '.join(missing)}")
    config = ServeConfig(
        catalog_path=args["catalog"],
        store=args["store"],
        public_url=args.get("public_url", "http://127.0.0.1:8000"),
        api_keys=load_api_keys(args.get("api_keys_file")),
        api_keys_file=args.get("api_keys_file"),
        url_secret=args.get("url_secret") or secrets.token_hex(32),
        url_ttl_s=int(args.get("url_ttl_s", 3600)),
        placement_timeout_s=float(args.get("placement_timeout_s", 60)),
        load_timeout_s=float(args.get("load_timeout_s", 600)),
        job_retention_s=float(args.get("job_retention_s", 24 * 3600)),
        gateway_replicas=int(args.get("gateway_replicas", 1)),
        env=storage_env(),
    )
    names = [n.strip() for n in args["models"].split(",") if n.strip()] if args.get("models") else None
    return build_app(config, served_models(Catalog.load(config.catalog_path), names))
