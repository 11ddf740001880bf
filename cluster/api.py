"""The online API's typed edges: OpenAI-compatible requests and errors, validated once at the boundary.

Request models are built from the same parameter table as manifest columns, and validated against
the deployment's own Limits (passed as validation context), so batch and online accept the same values
and fail with the same reason codes.
"""

from __future__ import annotations

import copy
import os
import re
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, create_model, field_validator
from pydantic_core import PydanticCustomError
from starlette.requests import Request

from pipelines.media.formats import TASK_FORMATS
from storage.params import BY_NAME, PARAMETERS, Limits, check_size
from storage.fs import is_remote
from storage.reasons import REASONS, RowError, reason_of


class APIError(Exception):
    """An error that becomes an OpenAI-shaped response."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    """Every error this API sends, whatever its status: OpenAI's shape."""

    error: ErrorDetail


class OutputItem(BaseModel):
    b64_json: str | None = None
    url: str | None = None
    revised_prompt: str | None = None


class Usage(BaseModel):
    """OpenAI's token-shaped usage keys: zeros, since diffusion models take no tokens we bill."""

    input_tokens: int = 0
    output_tokens: int = 0
    total_tokens: int = 0
    input_tokens_details: dict[str, int] = {"image_tokens": 0, "text_tokens": 0}


class RenderCall(BaseModel):
    """One pipeline call that rendered a request's outputs: its id (per replica) and the rows it rendered, from
    any request; requests share a call only when model, size, call parameters and adapter set all match."""

    id: str
    rows: int


class RenderUsage(BaseModel):
    """What a request cost us, apart from OpenAI's token keys."""

    outputs: int
    steps: int
    compute_s: float
    calls: list[RenderCall] = []


class GenerationResponse(BaseModel):
    """What every generation route answers: OpenAI's images response shape, every field filled."""

    created: int
    data: list[OutputItem]
    size: str | None = None
    output_format: str | None = None
    quality: str | None = None
    usage: Usage | None = None
    render_usage: RenderUsage | None = None


def usage_fields(results: list[dict], output_format: str, quality: str | None) -> dict[str, Any]:
    """The response's size, output_format, quality and usage, from the rendered rows; `render_usage.calls` names the
    pipeline calls that rendered them and how many rows (from any request) each rendered."""
    first = results[0] if results else {}
    size = f"{first['width']}x{first['height']}" if first.get("width") and first.get("height") else None
    steps = sum(int(r.get("num_inference_steps") or 0) for r in results)
    compute = sum(float(r.get("render_s") or 0.0) for r in results)
    calls = {r["call_id"]: r.get("call_rows") for r in results if r.get("call_id")}
    return {"size": size, "output_format": output_format, "quality": quality or "auto", "usage": Usage().model_dump(),
            "render_usage": {"outputs": len(results), "steps": steps, "compute_s": round(compute, 3),
                             "calls": [{"id": k, "rows": v} for k, v in calls.items()]}}


# What the OpenAPI document says every route may answer: 400 and any other error, all in the error shape.
_ERROR = {"model": ErrorResponse}
ERROR_RESPONSES: dict[int | str, dict] = {
    400: {**_ERROR, "description": "The request is invalid: `param` names the field"},
    "default": {**_ERROR, "description": "Any other error (401, 403, 404, 405, 413, 500, 503)"},
}
# Generation routes answer OpenAI's shape; a 503 (with Retry-After) when the model cannot take the request now.
GENERATION_ROUTE: dict[str, Any] = {"response_model": GenerationResponse, "response_model_exclude_none": True,
                                    "responses": {503: {**_ERROR, "description": "The model is at capacity or unavailable"}}}


def documented(model: type[BaseModel]) -> dict:
    """A JSON request body's schema for the OpenAPI document (routes parse bodies themselves, with limits)."""
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": model.model_json_schema()}}}}


def documented_form(model: type[BaseModel]) -> dict:
    """A multipart body: the model's fields plus the image (required) and mask files."""
    schema = model.model_json_schema()
    files = {"image": {"type": "string", "format": "binary"}, "mask": {"type": "string", "format": "binary"}}
    schema = {**schema, "properties": {**schema["properties"], **files}, "required": [*schema.get("required", ()), "image"]}
    return {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": schema}}}}


MAX_JSON_BYTES = 1024 * 1024  # a JSON request body; prompts are capped far below this by Limits


def form_limit(max_upload_bytes: int) -> int:
    """A multipart body's limit: an image and a mask of `max_upload_bytes` each, plus 1 MiB of fields."""
    return 2 * max_upload_bytes + 1024 * 1024


def refuse_declared(request: Request, limit: int, what: str) -> None:
    """A 413 before reading, when the declared body length is over `limit` bytes."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise APIError(413, f"request body is over the {limit}-byte limit for {what}", code="request_too_large")


async def body_bytes(request: Request, limit: int = MAX_JSON_BYTES) -> bytes:
    """A JSON request's body, refused with a 413 once it passes `limit` bytes (declared or streamed)."""
    refuse_declared(request, limit, "a JSON request")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise APIError(413, f"request body is over the {limit}-byte limit for a JSON request", code="request_too_large")
        chunks.append(chunk)
    return b"".join(chunks)


_PATH = re.compile(r"s3://[^\s'\"]+|(?<![\w:/.~-])/(?:[\w.~-]+/)*[\w.~-]+")


def public_message(message: str, uploads: dict[str, str] | None = None) -> str:
    """An error message fit for clients: uploads (uri -> form field) named by their field, other paths elided."""
    for uri, name in (uploads or {}).items():
        for spelling in sorted({uri} if is_remote(uri) else {uri, os.path.realpath(uri)}, key=len, reverse=True):
            message = re.sub(rf"(?:{name}_uri:? )?'?{re.escape(spelling)}'?", name, message)
    return _PATH.sub("<path>", message)


# HTTP errors raised outside our routes (unknown route, wrong method, unparseable multipart), by status.
_HTTP_CODES = {400: "invalid_request", 401: "invalid_api_key", 403: "forbidden", 404: "not_found",
               405: "method_not_allowed", 413: "request_too_large", 415: "unsupported_media_type"}


def http_error(status: int, detail: Any) -> APIError:
    """A framework HTTP error (Starlette's HTTPException) in our error shape."""
    message = detail if isinstance(detail, str) and detail else f"HTTP {status}"
    return APIError(status, message, type_="invalid_request_error" if status < 500 else "server_error",
                    code=_HTTP_CODES.get(status, "server_error" if status >= 500 else "invalid_request"))


def failure_error(error: str) -> APIError:
    """A failed row's `code: message` as the HTTP error its reason calls for."""
    reason = reason_of(error)
    return APIError(reason.http_status, error, type_="invalid_request_error" if reason.client_error else "server_error",
                    code=reason.code)


def invalid(errors: list[dict]) -> APIError:
    """The first validation error as a 400 naming the field, with our reason code where one applies."""
    first = errors[0] if errors else {}
    kind = first.get("type")
    # The request field: the first name in the location (never a JSON character offset or a list index).
    names = [x for x in first.get("loc", ()) if isinstance(x, str) and x != "body"]
    param = names[0] if names and kind != "json_invalid" else None
    code = kind if kind in REASONS else "invalid_json" if kind == "json_invalid" else "invalid_value"
    return APIError(400, f"{param or 'request'}: {first.get('msg', 'invalid request')}", param=param, code=code)


def _limits(info: ValidationInfo) -> Limits:
    return (info.context or {}).get("limits") or Limits()


def _rejected(e: RowError) -> PydanticCustomError:
    return PydanticCustomError(e.code, str(e).split(": ", 1)[-1])


def parse_size(size: str | None, limits: Limits) -> tuple[int | None, int | None]:
    """'WxH' (multiples of 8, under the pixel cap) or None/'auto'."""
    if size in (None, "auto"):
        return None, None
    m = re.fullmatch(r"(\d{1,5})x(\d{1,5})", size)
    if not m:
        raise RowError("invalid_size", "size must look like '512x512'")
    w, h = int(m.group(1)), int(m.group(2))
    check_size(w, h, limits)
    return w, h


class LoraRef(BaseModel):
    """One LoRA adapter online: a catalog name (of kind lora) and its scale."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=256)
    scale: float = Field(1.0, ge=-10.0, le=10.0)


class GenerationRequest(BaseModel):
    """Fields shared by every generation route (OpenAI's names, plus diffusers' extensions).

    Validate with `model_validate(..., context={"limits": deployment_limits})`.
    """

    model_config = ConfigDict(extra="ignore")

    prompt: str = Field(min_length=1)
    model: str | None = None
    n: int = Field(1, ge=1, le=10)
    response_format: Literal["b64_json", "url"] = "b64_json"
    user: str | None = Field(None, max_length=256)
    negative_prompt: str | None = None
    seed: int | None = None
    quality: str | None = Field(None, description="a name the model's catalog `serve.quality` maps to a step count, or auto")
    style: str | None = Field(None, description="a name the model's catalog `serve.styles` maps, else a 400")
    loras: list[LoraRef] | None = Field(None, description="LoRA adapters by catalog name, each with a scale")
    embeddings: list[str] | None = Field(None, description="textual-inversion embeddings by catalog name")
    job: bool = Field(False, description="answer at once with an async job object (also: header Prefer: respond-async)")

    task: ClassVar[str] = "image"

    @field_validator("*")
    @classmethod
    def _within_limits(cls, value: Any, info: ValidationInfo) -> Any:
        limits = _limits(info)
        name = info.field_name
        try:
            if name in ("prompt", "negative_prompt") and value is not None and len(value) > limits.max_prompt_chars:
                raise RowError("invalid_prompt", f"{len(value)} characters, limit {limits.max_prompt_chars}")
            if name == "seed" and value is not None:
                # Image i renders with seed + i, so the last of n seeds must fit too (n is validated first).
                n = info.data.get("n", 1)
                if not 0 <= value <= 2**63 - n:
                    raise RowError("invalid_seed", f"seed={value} with n={n} must be in 0..2**63-{n} (image i uses seed+i)")
            if name == "size":
                parse_size(value, limits)
            if name == "output_format" and value not in TASK_FORMATS[cls.task]:
                raise RowError("invalid_output_format", f"{value!r} for {cls.task}; expected one of {', '.join(TASK_FORMATS[cls.task])}")
            if name in BY_NAME:
                return BY_NAME[name].check(value, limits)
        except RowError as e:
            raise _rejected(e) from None
        return value


class SizedRequest(GenerationRequest):
    """Requests with an OpenAI-style "WxH" size."""

    size: str | None = Field("auto", json_schema_extra={"pattern": r"^(\d{1,5}x\d{1,5}|auto)$", "examples": ["512x512", "auto"]})


class ControlledRequest(SizedRequest):
    """Image routes: ControlNet images as data URLs (edits also take them as multipart files)."""

    control_images: list[str] | None = Field(None, max_length=8, description="data:image/...;base64 URLs, one per ControlNet")


class VideoRequest(SizedRequest):
    """Video routes: OpenAI's `seconds` (a string in its video API), turned into num_frames at the request's fps."""

    seconds: str | float | None = Field(None, description="clip length; num_frames = seconds x fps (fps default 8)")

    def frames_for_seconds(self) -> int | None:
        """num_frames from `seconds` (RowError when it is not a positive number), or None when not given."""
        if self.seconds is None:
            return None
        try:
            seconds = float(self.seconds)
        except ValueError:
            raise RowError("invalid_frames", f"seconds={self.seconds!r} is not a number") from None
        if not 0 < seconds <= 3600:
            raise RowError("invalid_frames", f"seconds={self.seconds!r} must be positive")
        return max(1, round(seconds * (getattr(self, "fps", None) or 8)))


def _request_model(name: str, task: str, base: type[GenerationRequest]) -> type[GenerationRequest]:
    """A route's request model: the base fields, the task's output formats and its tabled parameters."""
    types = {"int": int | None, "number": float | None, "number_or_numbers": float | list[float] | None}
    fields: dict[str, Any] = {
        p.name: (types[p.kind], Field(None, description=p.description)) for p in PARAMETERS if not p.tasks or task in p.tasks
    }
    formats = TASK_FORMATS[task]
    fields["output_format"] = (str, Field(formats[0], json_schema_extra={"enum": list(formats)}))
    model = create_model(name, __base__=base, **fields)
    model.task = task
    return model


ImageGenerationRequest = _request_model("ImageGenerationRequest", "image", ControlledRequest)
ImageEditRequest = _request_model("ImageEditRequest", "edit", ControlledRequest)
VideoGenerationRequest = _request_model("VideoGenerationRequest", "video", VideoRequest)
AudioGenerationRequest = _request_model("AudioGenerationRequest", "audio", GenerationRequest)
MeshGenerationRequest = _request_model("MeshGenerationRequest", "mesh", GenerationRequest)


def row_values(body: GenerationRequest) -> dict[str, Any]:
    """The request's tabled parameters, as manifest-row columns."""
    values = body.model_dump()
    return {p.name: values[p.name] for p in PARAMETERS if p.name in values}


def bounded_openapi(openapi: dict, limits: Limits) -> dict:
    """The OpenAPI document with a deployment's own bounds on request fields (the models check them, with
    reason codes; the document only says what they are)."""
    bounds = {p.name: p.bounds(limits) for p in PARAMETERS} | {"seed": (0, 2**63 - 1)}
    doc = copy.deepcopy(openapi)
    for operations in doc["paths"].values():
        for operation in operations.values():
            for content in operation.get("requestBody", {}).get("content", {}).values():
                for name, prop in content["schema"].get("properties", {}).items():
                    low, high = bounds.get(name, (None, None))
                    for branch in prop.get("anyOf", [prop]):
                        kind = branch.get("type")
                        if low is not None and kind in ("integer", "number", "array"):
                            (branch["items"] if kind == "array" else branch).update(minimum=low, maximum=high)
                        if name in ("prompt", "negative_prompt") and kind == "string":
                            branch["maxLength"] = limits.max_prompt_chars
    return doc
