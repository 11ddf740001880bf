"""The online API's typed edges: OpenAI-compatible requests and errors, validated once at the boundary."""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from storage.manifest import Limits

MAX_PROMPT_CHARS = 4000


class APIError(Exception):
    """An error that becomes an OpenAI-shaped response."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class GenerationRequest(BaseModel):
    """Fields shared by every generation route (OpenAI's names, plus diffusers' extensions)."""

    model_config = ConfigDict(extra="ignore")

    prompt: str = Field(min_length=1, max_length=MAX_PROMPT_CHARS)
    model: str | None = None
    n: int = Field(1, ge=1, le=10)
    response_format: Literal["b64_json", "url"] = "b64_json"
    user: str | None = Field(None, max_length=256)
    negative_prompt: str | None = Field(None, max_length=MAX_PROMPT_CHARS)
    num_inference_steps: int | None = Field(None, ge=1, le=Limits.max_steps)
    guidance_scale: float | None = Field(None, ge=0.0, le=100.0)
    seed: int | None = Field(None, ge=0, lt=2**63)


def parse_size(size: str | None, max_pixels: int) -> tuple[int | None, int | None]:
    """'WxH' (multiples of 8, under the pixel cap) or None/'auto'."""
    if size in (None, "auto"):
        return None, None
    m = re.fullmatch(r"(\d{1,5})x(\d{1,5})", size)
    if not m:
        raise ValueError("size must look like '512x512'")
    w, h = int(m.group(1)), int(m.group(2))
    if w <= 0 or h <= 0 or w % 8 or h % 8:
        raise ValueError("width and height must be positive multiples of 8")
    if w * h > max_pixels:
        raise ValueError(f"{w}x{h} is over the {max_pixels}-pixel limit")
    return w, h


class SizedRequest(GenerationRequest):
    """Requests with an OpenAI-style "WxH" size."""

    size: str | None = "auto"

    @field_validator("size")
    @classmethod
    def _size(cls, v: str | None) -> str | None:
        parse_size(v, Limits.max_pixels)
        return v


class ImageGenerationRequest(SizedRequest):
    output_format: Literal["png", "jpeg", "webp"] = "png"


class VideoGenerationRequest(SizedRequest):
    num_frames: int | None = Field(None, ge=1, le=Limits.max_frames)
    fps: float | None = Field(None, gt=0, le=Limits.max_fps)
    output_format: Literal["mp4", "gif", "webp"] = "mp4"


class AudioGenerationRequest(GenerationRequest):
    audio_length_in_s: float | None = Field(None, gt=0, le=Limits.max_audio_s)
    output_format: Literal["wav"] = "wav"


class MeshGenerationRequest(GenerationRequest):
    output_format: Literal["glb", "ply", "obj"] = "glb"
