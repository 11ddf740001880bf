"""The pool-sizing options of `render` (and `submit render`): `--workers N|MIN..MAX`, `--worker-resources NAME=AMOUNT`.

Kept apart from jobs/cli.py, and free of heavy imports, so `--help` stays quick and the CLI stays small.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import dataclass

REFUSED = ("CPU", "GPU", "memory", "object_store_memory")  # sized by the plan or by --gpus-per-worker


@dataclass(frozen=True)
class Workers:
    """`--workers`: a fixed pool (max None) or an elastic one; prints back as typed, so `submit` can forward it."""

    min: int
    max: int | None = None

    def __str__(self) -> str:
        return f"{self.min}..{self.max}" if self.max is not None else str(self.min)


def parse_workers(text: str) -> Workers:
    """`N` -> Workers(N); `MIN..MAX` -> Workers(MIN, MAX), an elastic pool. ValueError when malformed."""
    low, sep, high = text.strip().partition("..")
    try:
        lo, hi = int(low), (int(high) if sep else None)
    except ValueError:
        raise ValueError(f"{text!r} is neither N nor MIN..MAX") from None
    if lo < 1 or (hi is not None and hi < lo):
        raise ValueError(f"{text!r}: want N >= 1, or 1 <= MIN <= MAX")
    return Workers(lo, hi)


def parse_resources(items: Sequence[str]) -> dict[str, float]:
    """`NAME=AMOUNT` pairs that each actor asks Ray for (e.g. accel=1); ValueError when malformed."""
    found: dict[str, float] = {}
    for item in items:
        name, sep, amount = item.partition("=")
        name = name.strip()
        try:
            value = float(amount)
        except ValueError:
            value = -1.0
        if not sep or not name or value <= 0 or name in REFUSED:
            raise ValueError(f"--worker-resources {item!r}: want NAME=AMOUNT, a custom resource with a positive amount "
                             "(CPU and memory are sized from the nodes, GPUs by --gpus-per-worker)")
        found[name] = value
    return found


def _workers_type(text: str) -> Workers:
    try:
        return parse_workers(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _resource_type(text: str) -> str:
    try:
        parse_resources([text])
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def add_scaling_args(p: argparse.ArgumentParser) -> None:
    """Adds --workers and --worker-resources to a render parser."""
    p.add_argument("--workers", type=_workers_type, metavar="N|MIN..MAX",
                   help="render actors: N, or MIN..MAX for an elastic pool that grows while rows queue and nodes "
                        "join (default: one per GPU, or CPUs/2)")
    p.add_argument("--worker-resources", action="append", default=[], metavar="NAME=AMOUNT", type=_resource_type,
                   help="a custom Ray resource each actor asks for, e.g. accel=1 (an autoscaler launches nodes that "
                        "have it; repeatable; default: none)")


def scaling_fields(args: argparse.Namespace) -> dict[str, object]:
    """RenderJob's workers, max_workers and worker_resources from the parsed options."""
    workers: Workers | None = args.workers
    return {"workers": workers.min if workers else None, "max_workers": workers.max if workers else None,
            "worker_resources": parse_resources(args.worker_resources)}
