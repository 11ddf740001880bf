"""The gateway's FastAPI app, error handlers and metrics, shared by the route modules (serve_app, serve_jobs).

Route classes decorate their methods with this module's `app`; Serve's ingress binds every route of the
Gateway's class hierarchy to the replica's instance.
"""

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from cluster.api import ERROR_RESPONSES, APIError, http_error, invalid

log = logging.getLogger(__name__)

app = FastAPI(title="renderfleet", docs_url=None, redoc_url=None, openapi_url=None,  # /openapi.json is a keyed route
              responses=ERROR_RESPONSES)


class ReplicaHeader:
    """Adds `X-Renderfleet-Replica` (the Serve replica's id) to every answer: which gateway replica answered,
    for operators and for the tests that spread requests over replicas."""

    def __init__(self, inner: Any):
        self.inner, self.value = inner, b""

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.inner(scope, receive, send)
        if not self.value:
            from ray import serve

            try:
                self.value = serve.get_replica_context().replica_id.unique_id.encode()
            except Exception:  # noqa: BLE001 - outside a replica (plain FastAPI tests): no header
                self.value = b"-"

        async def send_with_header(message: dict) -> None:
            if message["type"] == "http.response.start" and self.value != b"-":
                message = {**message, "headers": [*message.get("headers", []), (b"x-renderfleet-replica", self.value)]}
            await send(message)

        await self.inner(scope, receive, send_with_header)


app.add_middleware(ReplicaHeader)


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


def gateway_metrics() -> tuple[Any, dict[str, Any]]:
    """Our Prometheus metrics, one registry per gateway replica."""
    from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

    registry = CollectorRegistry()
    return registry, {
        "requests": Counter("renderfleet_requests", "HTTP requests by model and status", ["model", "route", "status"], registry=registry),
        "outputs": Counter("renderfleet_outputs", "outputs rendered by model and task", ["model", "task"], registry=registry),
        "filtered": Counter("renderfleet_filtered", "filtered prompts and outputs by reason", ["model", "reason"], registry=registry),
        "render_s": Histogram("renderfleet_render_seconds", "model-side seconds per batch", ["model"], registry=registry),
        "batch": Histogram("renderfleet_batch_size", "rows per model call batch", ["model"],
                           buckets=(1, 2, 3, 4, 6, 8, 12, 16, 32), registry=registry),
        "queue_depth": Gauge("renderfleet_queue_depth", "rows sent to a model and not yet answered (this gateway)", ["model"],
                             registry=registry),
        "queue_s": Histogram("renderfleet_queue_seconds", "seconds a row waited before its batch started (wait minus render)",
                             ["model"], registry=registry),
        "refused": Counter("renderfleet_refused", "429 and 503 answers by reason code", ["status", "reason"], registry=registry),
        "output_writes": Counter("renderfleet_output_writes", "b64_json outputs stored after their response, by result",
                                 ["result"], registry=registry),
        "jobs": Gauge("renderfleet_jobs", "async jobs in the store by status (counted when scraped)", ["status"], registry=registry),
    }
