"""Renderfleet's own last steps on every decoded output, batch and online alike: safety check,
invisible watermark, encoding, provenance metadata and Content Credentials.

They run outside the diffusers pipelines, so every family gets them, including those that ship
no safety checker (SDXL, video and 3D models).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from pipelines.catalog import SafetySettings
from pipelines.media.encode import encode
from pipelines.media.formats import get_format
from pipelines.media.provenance import embed_metadata
from pipelines.media.watermark import WatermarkConfig, embed, embed_frames
from pipelines.policy import PromptPolicy
from pipelines.safety import SafetyChecker, blur, frames_to_check


@dataclass(frozen=True)
class Finished:
    """One output ready to store, or a blocked one (nothing to store)."""

    blocked: bool = False
    data: bytes = b""
    ext: str = ""
    content_type: str = ""
    nsfw: bool | None = None
    safety_action: str | None = None
    watermark: str = "not_applicable"
    c2pa: str = "not_applicable"


class Finisher:
    """Holds the policy, checker, watermark and signing settings of one catalog."""

    def __init__(self, settings: SafetySettings, checker_dir: str | None = None, device: Any = "cpu",
                 action: str | None = None):
        self.settings = settings
        self.action = action or settings.action
        self.policy = PromptPolicy.load(settings.prompt_policy) if settings.prompt_policy else None
        self.checker = SafetyChecker.from_pretrained(checker_dir, device=device) if checker_dir else None
        self.watermark = None
        if settings.watermark:
            self.watermark = (WatermarkConfig.from_hex(settings.watermark_message, settings.watermark_method)
                              if settings.watermark_message else WatermarkConfig(method=settings.watermark_method))
        self.signing = None
        if settings.c2pa_cert_chain:
            from pipelines.media.credentials import SigningConfig

            self.signing = SigningConfig(cert_chain_pem=settings.c2pa_cert_chain, private_key_pem=settings.c2pa_private_key)

    def blocked_prompt(self, prompt: str | None) -> str | None:
        """The policy rule a prompt breaks, if any (checked before anything renders)."""
        return self.policy.check(prompt) if self.policy and prompt else None

    def flags(self, task: str, decoded: list[Any]) -> list[bool | None]:
        """Checker verdicts per output (None where no checker applies): one forward pass for the group."""
        if self.checker is None or task not in ("image", "edit", "video"):
            return [None] * len(decoded)
        images: list[Image.Image] = []
        owners: list[int] = []
        for i, out in enumerate(decoded):
            if task == "video":
                picked = [Image.fromarray(out[k]) for k in frames_to_check(len(out), self.settings.frame_stride)]
            else:
                picked = [out]
            images += picked
            owners += [i] * len(picked)
        verdicts = self.checker.check(images) if images else []
        flagged = [False] * len(decoded)
        for owner, verdict in zip(owners, verdicts):
            flagged[owner] = flagged[owner] or bool(verdict)
        return flagged

    def finish(self, task: str, decoded: Any, flagged: bool | None, output_format: str, fps: float | None,
               record: dict[str, str]) -> Finished:
        """Applies the safety action, watermark, encoding, metadata and signature to one output."""
        action = None
        if flagged:
            if self.action == "block":
                return Finished(blocked=True, nsfw=True, safety_action="block")
            action = self.action
            if action == "blur":
                decoded = blur(decoded) if task != "video" else [np.asarray(blur(Image.fromarray(f))) for f in decoded]
        fmt = get_format(output_format)
        mark = "not_applicable"
        if fmt.watermark:
            if self.watermark is None:
                mark = "disabled"
            elif task == "video":
                decoded, mark = embed_frames(decoded, self.watermark)
            else:
                decoded, mark = embed(decoded, self.watermark)
        data, ext, content_type = encode(task, decoded, output_format, fps=fps)
        if fmt.metadata:
            data = embed_metadata(data, output_format, record)
        c2pa = "not_applicable"
        if fmt.signable:
            if self.signing is None:
                c2pa = "unsigned: no signing key configured"
            else:
                from pipelines.media.credentials import sign_asset

                data = sign_asset(data, fmt.mime, self.signing, record)
                c2pa = "signed"
        return Finished(data=data, ext=ext, content_type=content_type, nsfw=flagged, safety_action=action,
                        watermark=mark, c2pa=c2pa)
