"""Sizing the actor pool from what the cluster has."""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class WorkerPlan:
    """How many render actors, and what each one reserves."""

    workers: int
    num_cpus: float
    num_gpus: float
    torch_threads: int


def plan_workers(cluster: dict[str, float], workers: int | None = None, gpus_per_worker: float = 1.0) -> WorkerPlan:
    """One actor per GPU share on GPU clusters; on CPU-only clusters fractional CPUs, leaving one for reads.

    Actors that each take a whole CPU starve Ray Data's read tasks on small machines, and
    Ray then sizes torch to the fraction, so torch threads are set explicitly.
    """
    cpus = float(cluster.get("CPU", 1))
    gpus = float(cluster.get("GPU", 0))
    if gpus > 0:
        n = workers or max(1, math.floor(gpus / gpus_per_worker))
        per_cpu = max(0.25, min(1.0, (cpus - 1) / n))
        return WorkerPlan(n, per_cpu, gpus_per_worker, max(1, math.floor(cpus / n) - 1) if cpus > n else 1)
    n = workers or max(1, math.floor(cpus / 2))
    per_cpu = max(0.1, min(1.0, (cpus - 1) / n)) if cpus > 1 else 0.5 / n
    threads = max(1, math.floor(cpus / n))
    return WorkerPlan(n, round(per_cpu, 3), 0.0, threads)
