"""Why a row did not render: one typed set of reasons, shared by batch results and HTTP errors.

A row's `error` is `code: message`; the code is always one of REASONS, and each reason knows
the HTTP status it becomes online, so a new client-side reason can never surface as a 500.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Reason:
    code: str
    http_status: int  # 4xx: the request (or row) was wrong; 5xx: we failed
    summary: str

    @property
    def client_error(self) -> bool:
        return self.http_status < 500


_ALL = (
    # The row names something we do not have.
    Reason("unknown_model", 404, "the model is not in the catalog (or is not a pipeline)"),
    Reason("unknown_task", 400, "task is not one of image, edit, video, mesh, audio"),
    Reason("unsupported_task", 400, "the model does not serve the row's task"),
    # The row's values.
    Reason("missing_prompt", 400, "the model needs a prompt and the row has none"),
    Reason("missing_input", 400, "an input asset the row needs is absent or does not exist"),
    Reason("invalid_input", 400, "an input asset is unreadable, not an image, or over a limit"),
    Reason("input_unavailable", 503, "an input asset's store did not answer (retried); a rerun retries the row"),
    Reason("input_not_allowed", 400, "a local input lies outside the manifest's folder and the --input-root folders"),
    Reason("invalid_prompt", 400, "the prompt is over the length limit"),
    Reason("invalid_seed", 400, "seed outside 0..2**63-1"),
    Reason("invalid_steps", 400, "num_inference_steps outside its bounds"),
    Reason("invalid_guidance", 400, "a guidance scale outside its bounds"),
    Reason("invalid_size", 400, "width/height not positive multiples of 8, or over the pixel limit"),
    Reason("invalid_strength", 400, "strength outside 0..1"),
    Reason("invalid_frames", 400, "num_frames outside its bounds"),
    Reason("invalid_fps", 400, "fps outside its bounds"),
    Reason("invalid_audio_length", 400, "audio_length_in_s outside its bounds"),
    Reason("invalid_output_format", 400, "the output format does not fit the task"),
    Reason("invalid_class_label", 400, "class_label outside the model's classes"),
    Reason("invalid_control_images", 400, "the number of control images does not match the model's ControlNets"),
    Reason("invalid_controlnet_scale", 400, "controlnet_conditioning_scale outside its bounds"),
    Reason("invalid_lora", 400, "a LoRA reference is malformed or names a non-LoRA"),
    Reason("invalid_embedding", 400, "an embedding reference names a non-embedding"),
    Reason("invalid_value", 400, "a value has the wrong type or shape"),
    Reason("unsupported_quality", 400, "online: the model's catalog `serve.quality` does not map this quality"),
    Reason("unsupported_style", 400, "online: the model's catalog `serve.styles` does not map this style"),
    # Safety (status `filtered`, final).
    Reason("prompt_policy", 400, "the prompt breaks the content policy"),
    Reason("nsfw_output", 400, "the output was flagged and the safety action is block"),
    # Online only: the server cannot take the request now (each answered with Retry-After).
    Reason("model_unplaceable", 503, "no replica of the model could be placed or started within the placement timeout"),
    Reason("model_start_failed", 503, "the model's replicas fail to start (its deployment is unhealthy)"),
    Reason("rate_limited", 429, "the API key is over its requests per minute or concurrent jobs"),
    # Ours.
    Reason("model_load_error", 500, "the model or an adapter could not be loaded"),
    Reason("render_error", 500, "the pipeline call failed"),
    Reason("safety_check_error", 500, "the output checker failed; nothing unchecked is written"),
    Reason("write_error", 500, "the output could not be finished or stored"),
    Reason("internal_error", 500, "an unexpected error while preparing the row"),
)
REASONS: dict[str, Reason] = {r.code: r for r in _ALL}


def reason_of(error: str | None) -> Reason:
    """The reason behind a `code: message` error string (internal_error when unknown)."""
    code = (error or "").split(":", 1)[0].strip()
    return REASONS.get(code, REASONS["internal_error"])


class RowError(ValueError):
    """One row is unusable; it fails with `code: message` and the others go on."""

    def __init__(self, code: str, message: str):
        if code not in REASONS:
            raise ValueError(f"row failure code {code!r} is not in storage.reasons.REASONS")
        super().__init__(f"{code}: {message}")
        self.code = code
        self.reason = REASONS[code]
