"""Denoising steps as they happen, so a long render can say how far it is.

Diffusers reports steps two ways: newer pipelines take `callback_on_step_end(pipe, step, timestep, kwargs)`,
older ones (TextToVideoSD, AudioLDM, IF, StableAudio) `callback(step, timestep, latents)` + `callback_steps`.
Families with neither (Shap-E, DiT) report nothing. A report that raises never fails the render.
"""

from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)

# (steps done, steps total) over a whole call, all its stages included; total is a best estimate.
StepReport = Callable[[int, int], None]


def step_hooks(pipe: Any, accepted: frozenset[str], on_step: Callable[[int | None], None]) -> dict[str, Any]:
    """The call arguments that make `pipe` call `on_step(actual total or None)` once per denoising step."""
    if "callback_on_step_end" in accepted:
        def on_end(p: Any, step: int, timestep: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
            total = getattr(p, "_num_timesteps", None)  # what the pipeline really runs (img2img strength included)
            on_step(total if isinstance(total, int) and total > 0 else None)
            return kwargs

        return {"callback_on_step_end": on_end}
    if "callback" in accepted and "callback_steps" in accepted:
        return {"callback": lambda step, timestep, latents: on_step(None), "callback_steps": 1}
    return {}


def requested_steps(pipe: Any, kwargs: dict[str, Any]) -> int:
    """The steps a call asks for: its argument, else the signature's default, else 1 (never 0: it divides)."""
    steps = kwargs.get("num_inference_steps")
    if steps is None:
        steps = _default_steps(type(pipe))
    return steps if isinstance(steps, int) and steps > 0 else 1


@functools.lru_cache(maxsize=None)
def _default_steps(cls: type) -> Any:
    """Per class: reading a signature per call adds up."""
    parameter = inspect.signature(cls.__call__).parameters.get("num_inference_steps")
    return None if parameter is None else parameter.default


class StepTally:
    """Steps over a call's stages: each stage counts its own callbacks (indices restart in some families'
    inner loops, so calls are counted, not read), and every step reports the sum against the summed totals."""

    def __init__(self, report: StepReport, totals: list[int]):
        self.report = report
        self.totals = list(totals)
        self.done = [0] * len(totals)
        self._failed = False

    def stage(self, index: int) -> Callable[[int | None], None]:
        """The per-step hook for stage `index`."""
        def on_step(total: int | None) -> None:
            self.done[index] += 1
            if total:
                self.totals[index] = total
            self.totals[index] = max(self.totals[index], self.done[index])
            self._send(sum(self.done), sum(self.totals))

        return on_step

    def _send(self, done: int, total: int) -> None:
        if self._failed:
            return
        try:
            self.report(done, total)
        except Exception:  # noqa: BLE001 - progress is a courtesy; the render goes on without it
            self._failed = True
            log.exception("step progress report failed; this call reports no more steps")
