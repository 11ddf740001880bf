"""The online API's typed edges: OpenAI-compatible requests and errors, validated once at the boundary.

Request models are built from the same parameter table as manifest columns, and validated against
the deployment's own Limits (passed as validation context), so batch and online accept the same values
and fail with the same reason codes.
"""

from __future__ import annotations

import re
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, create_model, field_validator
from pydantic_core import PydanticCustomError

from pipelines.media.formats import TASK_FORMATS
from storage.params import BY_NAME, PARAMETERS, Limits, check_size
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


def failure_error(error: str) -> APIError:
    """A failed row's `code: message` as the HTTP error its reason calls for."""
    reason = reason_of(error)
    return APIError(reason.http_status, error, type_="invalid_request_error" if reason.client_error else "server_error",
                    code=reason.code)


def invalid(errors: list[dict]) -> APIError:
    """The first validation error as a 400 naming the field, with our reason code where one applies."""
    first = errors[0] if errors else {}
    loc = [str(x) for x in first.get("loc", ()) if x not in ("body",)]
    param = ".".join(loc) or None
    kind = first.get("type")
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

    task: ClassVar[str] = "image"

    @field_validator("*")
    @classmethod
    def _within_limits(cls, value: Any, info: ValidationInfo) -> Any:
        limits = _limits(info)
        name = info.field_name
        try:
            if name in ("prompt", "negative_prompt") and value is not None and len(value) > limits.max_prompt_chars:
                raise RowError("invalid_prompt", f"{len(value)} characters, limit {limits.max_prompt_chars}")
            if name == "seed" and value is not None and not 0 <= value < 2**63:
                raise RowError("invalid_seed", f"seed={value} must be in 0..2**63-1")
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

    size: str | None = "auto"


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


ImageGenerationRequest = _request_model("ImageGenerationRequest", "image", SizedRequest)
ImageEditRequest = _request_model("ImageEditRequest", "edit", SizedRequest)
VideoGenerationRequest = _request_model("VideoGenerationRequest", "video", SizedRequest)
AudioGenerationRequest = _request_model("AudioGenerationRequest", "audio", GenerationRequest)
MeshGenerationRequest = _request_model("MeshGenerationRequest", "mesh", GenerationRequest)


def row_values(body: GenerationRequest) -> dict[str, Any]:
    """The request's tabled parameters, as manifest-row columns."""
    values = body.model_dump()
    return {p.name: values[p.name] for p in PARAMETERS if p.name in values}
