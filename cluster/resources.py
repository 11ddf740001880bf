"""Sizing the actor pool from what each node has, not from the cluster's sum."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

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
    max_workers: int | None = None  # an elastic pool grows from `workers` up to this as work queues and nodes arrive
    resources: Mapping[str, float] = field(default_factory=dict)  # custom resources each actor asks for (accel=1)

    @property
    def elastic(self) -> bool:
        return self.max_workers is not None and self.max_workers > self.workers

    @property
    def label(self) -> str:
        """"4", or "1..4" for an elastic pool: what the job prints."""
        return f"{self.workers}..{self.max_workers}" if self.elastic else str(self.workers)


def node_resources() -> list[dict[str, float]]:
    """The resources of every alive node of the connected cluster."""
    return [dict(n["Resources"]) for n in ray.nodes() if n.get("Alive")]


def plan_workers(nodes: Sequence[Mapping[str, float]], workers: int | None = None, gpus_per_worker: float = 1.0,
                 max_workers: int | None = None, resources: Mapping[str, float] | None = None) -> WorkerPlan:
    """One actor per GPU share (or per `resources` share) on nodes that have it; on CPU-only clusters about one
    actor per two CPUs. `max_workers` makes the pool elastic: `workers..max_workers` actors.

    Each actor's CPU reservation fits the tightest node it may land on with TASK_CPUS to spare: a
    plan from the cluster's total (two 1-CPU nodes look like one 2-CPU node) starved the read tasks.
    Torch threads are set explicitly, since Ray sizes torch to the actor's fraction of a CPU.
    """
    nodes = [n for n in nodes if n.get("CPU", 0) > 0]
    if not nodes:
        raise ValueError("the cluster has no node with CPUs")
    resources = {k: float(v) for k, v in (resources or {}).items()}
    if any(v <= 0 for v in resources.values()):
        raise ValueError(f"worker resources must be positive amounts: {resources}")
    needs = dict(resources)
    if any(n.get("GPU", 0) >= gpus_per_worker for n in nodes):
        needs["GPU"] = gpus_per_worker
    if needs:
        fitting = [n for n in nodes if all(n.get(k, 0) >= v for k, v in needs.items())]
        slots = [min(math.floor(n[k] / v + 1e-9) for k, v in needs.items()) for n in fitting]
        n_workers = workers or max(1, sum(slots))
        top = max(n_workers, max_workers or 0)
        # No node has the resource yet (an autoscaler adds them on demand): size for one actor on a node like
        # the smallest one here.
        per_node = [(n["CPU"], min(s, top)) for n, s in zip(fitting, slots)] or [(min(n["CPU"] for n in nodes), 1)]
        return _plan(n_workers, per_node, needs.get("GPU", 0.0), max_workers, resources)
    total = sum(n["CPU"] for n in nodes)
    n_workers = workers or max(1, math.floor(total / 2))
    top = max(n_workers, max_workers or 0)
    # Ray spreads actors by free resources: a node gets about its share of them, at least one.
    per_node = [(n["CPU"], max(1, math.ceil(top * n["CPU"] / total))) for n in nodes]
    return _plan(n_workers, per_node, 0.0, max_workers, resources)


def _plan(workers: int, per_node: list[tuple[float, int]], gpus: float, max_workers: int | None = None,
          resources: Mapping[str, float] | None = None) -> WorkerPlan:
    """`per_node`: (CPUs, actors it may hold) for every node actors may use."""
    fits = min((cpus - TASK_CPUS) / actors for cpus, actors in per_node)
    # Rounded down: 4 actors of round(0.4375, 3) = 0.438 CPU on 2 CPUs left 0.248 for tasks asking 0.25 (a hang).
    num_cpus = max(0.05, min(1.0, math.floor(fits * 1000 + 1e-6) / 1000))
    threads = max(1, min(math.floor(cpus / actors) for cpus, actors in per_node))
    top = max(workers, max_workers) if max_workers else None
    return WorkerPlan(workers, num_cpus, gpus, threads, top if top and top > workers else None, dict(resources or {}))


def thread_env(threads: int | None) -> dict[str, dict[str, dict[str, str]]]:
    """The actor's OMP_NUM_THREADS, as `runtime_env` (merged with the job's env vars). Ray sets 1 for actors of
    under one CPU, and OpenMP gives every thread that count: Ray Data's and Serve's calling threads then render
    on one core whatever torch.set_num_threads said (bench (a) profile: a 2-thread actor used 1.08 cores)."""
    return {"runtime_env": {"env_vars": {"OMP_NUM_THREADS": str(threads)}}} if threads and threads > 1 else {}
