"""The least RGB change that moves a watermark block's quantised value onto its bit's target, inside [0, 255].

The watermark embedder (:mod:`pipelines.media.watermark`) moves only OpenCV's U channel, along
d(value)/d(RGB).  Where that step would leave [0, 255] it solves the box-constrained least-squares
problem exactly, and where clipping binds it picks the target (below or above) that costs less
change rather than the nearer one.  Kept apart from the watermark format so each file holds one concern.
"""

from __future__ import annotations

import numpy as np

__all__ = ["ARGMAX_MARGIN", "NEWTON_STEPS", "move_to_target"]

ARGMAX_MARGIN = 2.0
"""dwtDct: a coefficient lowered to its target must stay this far above the block's runner-up, or the decoder reads another."""

NEWTON_STEPS = 64
"""Cap on Newton steps in the box-constrained projection (each crosses at least one saturation point; ~5 are typical)."""


def _saturation(pixels: np.ndarray, direction: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per channel, how far mu can go up / down before x0 + mu * direction leaves [0, 255] (0 where it cannot move)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        to_high = np.where(direction > 0, (255.0 - pixels) / direction, -pixels / direction)
        to_low = np.where(direction > 0, pixels / direction, (pixels - 255.0) / direction)
    moving = direction != 0
    return np.where(moving, to_high, 0.0), np.where(moving, to_low, 0.0)


def move_to_target(
    pixels: np.ndarray,
    direction: np.ndarray,
    value: np.ndarray,
    below: np.ndarray,
    above: np.ndarray,
    runner_up: np.ndarray,
    method: str,
) -> np.ndarray:
    """(n, K) channels moved so each block's value reaches a target: the unconstrained least-squares step where it stays in [0, 255], else the exact box-constrained one."""
    weight = direction**2
    total = weight.sum(axis=1)
    d_below, d_above = below - value, above - value
    allowed_below = below >= 0
    if method == "dwtDct":
        allowed_below &= below > runner_up + ARGMAX_MARGIN
    take_below = allowed_below & (np.abs(d_below) <= np.abs(d_above))
    delta = np.where(take_below, d_below, d_above)
    mu = np.divide(delta, total, out=np.zeros_like(delta), where=total > 0)
    moved = pixels + mu[:, None] * direction
    hard = np.flatnonzero(np.any((moved < 0) | (moved > 255), axis=1))
    if len(hard):
        limits = _saturation(pixels[hard], direction[hard])
        high, low = (weight[hard] * limits[0]).sum(axis=1), -(weight[hard] * limits[1]).sum(axis=1)
        moved[hard] = _cheaper_target(
            pixels[hard], direction[hard], limits, d_below[hard], d_above[hard], low, high, allowed_below[hard], method
        )
    return moved


def _cheaper_target(
    pixels: np.ndarray,
    direction: np.ndarray,
    limits: tuple[np.ndarray, np.ndarray],
    d_below: np.ndarray,
    d_above: np.ndarray,
    low: np.ndarray,
    high: np.ndarray,
    allowed_below: np.ndarray,
    method: str,
) -> np.ndarray:
    """Where clipping binds, the target below or above whichever costs less RGB change (not the nearer one).

    E.g. raising U in magenta can only lower R, 7x dearer than lowering U through G and B; a
    target the pixels cannot reach loses to one they can, and if neither is reachable the block moves
    as far as it can towards the nearer (dwtDct: the upper, so its coefficient stays the largest).
    """
    outcomes = []
    for delta, allowed in ((d_below, allowed_below), (d_above, np.ones_like(allowed_below))):
        moved = _project(pixels, direction, limits, np.clip(delta, low, high))
        reachable = allowed & (delta >= low) & (delta <= high)
        outcomes.append((moved, np.sum((moved - pixels) ** 2, axis=1), reachable))
    (moved_b, cost_b, ok_b), (moved_a, cost_a, ok_a) = outcomes
    take_below = np.where(ok_b & ok_a, cost_b <= cost_a, ok_b)
    if method == "dwtDctSvd":
        neither = ~ok_b & ~ok_a
        take_below |= neither & (np.abs(d_below) <= np.abs(d_above))
    return np.where(take_below[:, None], moved_b, moved_a)


def _project(pixels: np.ndarray, direction: np.ndarray, limits: tuple[np.ndarray, np.ndarray], delta: np.ndarray) -> np.ndarray:
    """Least-squares change of (n, K) channels moving each row's value by ``delta`` in [0, 255]: clip(x0 + mu * direction).

    The value moves by g(mu) = sum(direction^2 * min(|mu|, limit)) (sign of mu = sign of delta): piecewise
    linear, increasing and concave, so Newton's method from mu = 0 climbs to the root without
    overshooting and is exact once it reaches the last segment (a few steps; no sort needed).
    """
    weight = direction**2
    limit = np.where((delta >= 0)[:, None], limits[0], limits[1])
    need = np.abs(delta)
    mu = np.zeros_like(need)
    for _ in range(NEWTON_STEPS):
        moving = limit > mu[:, None]
        gap = need - np.sum(weight * np.minimum(mu[:, None], limit), axis=1)
        slope = np.sum(weight * moving, axis=1)
        if not np.any((gap > 1e-9 * (1 + need)) & (slope > 0)):
            break
        mu = mu + np.divide(gap, slope, out=np.zeros_like(gap), where=(slope > 0) & (gap > 0))
    mu = np.where(delta >= 0, mu, -mu)
    return np.clip(pixels + mu[:, None] * direction, 0, 255)
