"""Sizing the actor pool from what each node has, not from the cluster's sum."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import ray

TASK_CPUS = 0.25
"""What each of the job's own Ray Data tasks (manifest reads, block ordering, results reads) reserves:
actors leave at least this much on every node they use, so the tasks that feed them always start."""


@dataclass(frozen=True)
class WorkerPlan:
    """How many render actors, and what each one reserves."""

    workers: int
    num_cpus: float
    num_gpus: float
    torch_threads: int


def node_resources() -> list[dict[str, float]]:
    """The resources of every alive node of the connected cluster."""
    return [dict(n["Resources"]) for n in ray.nodes() if n.get("Alive")]


def plan_workers(nodes: Sequence[Mapping[str, float]], workers: int | None = None,
                 gpus_per_worker: float = 1.0) -> WorkerPlan:
    """One actor per GPU share on GPU nodes; on CPU-only clusters about one actor per two CPUs.

    Each actor's CPU reservation fits the tightest node it may land on with TASK_CPUS to spare: a
    plan from the cluster's total (two 1-CPU nodes look like one 2-CPU node) starved the read tasks.
    Torch threads are set explicitly, since Ray sizes torch to the actor's fraction of a CPU.
    """
    nodes = [n for n in nodes if n.get("CPU", 0) > 0]
    if not nodes:
        raise ValueError("the cluster has no node with CPUs")
    gpu_nodes = [n for n in nodes if n.get("GPU", 0) >= gpus_per_worker]
    if gpu_nodes:
        slots = [math.floor(n["GPU"] / gpus_per_worker + 1e-9) for n in gpu_nodes]
        n_workers = workers or sum(slots)
        per_node = [(n["CPU"], s) for n, s in zip(gpu_nodes, slots)]
        return _plan(n_workers, per_node, gpus_per_worker)
    total = sum(n["CPU"] for n in nodes)
    n_workers = workers or max(1, math.floor(total / 2))
    # Ray spreads actors by free resources: a node gets about its share of them, at least one.
    per_node = [(n["CPU"], max(1, math.ceil(n_workers * n["CPU"] / total))) for n in nodes]
    return _plan(n_workers, per_node, 0.0)


def _plan(workers: int, per_node: list[tuple[float, int]], gpus: float) -> WorkerPlan:
    """`per_node`: (CPUs, actors it may hold) for every node actors may use."""
    fits = min((cpus - TASK_CPUS) / actors for cpus, actors in per_node)
    num_cpus = round(max(0.05, min(1.0, fits)), 3)
    threads = max(1, min(math.floor(cpus / actors) for cpus, actors in per_node))
    return WorkerPlan(workers, num_cpus, gpus, threads)
