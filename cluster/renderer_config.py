"""What a renderer actor is configured with: plain, torch-free data, so the driver builds it without importing
torch or diffusers (seconds of a job's start-up) and it travels to every worker."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from storage.params import Limits


@dataclass(frozen=True)
class PoolOptions:
    """Per-job pool settings that travel to every actor: policy overrides and the actor's GPU share."""

    policy: dict[str, Any] = field(default_factory=dict)  # Policy KEY -> value, over every catalog entry's policy
    gpu_share: float = 1.0  # the fraction of one device this actor holds (Ray num_gpus per actor)


@dataclass(frozen=True)
class RendererConfig:
    """Everything an actor needs; plain data so it travels to every worker."""

    catalog_path: str
    out: str
    limits: Limits = field(default_factory=Limits)
    device: str = "auto"
    torch_threads: int | None = None
    model_cache_dir: str | None = None
    env: dict[str, str] = field(default_factory=dict)
    input_base: str | None = None  # relative input URIs are relative to this (the manifest's folder)
    input_roots: tuple[str, ...] = ()  # other local folders inputs may come from (--input-root, online uploads)
    write_deadline_s: float = 120.0  # how long a failing output write is retried before its row fails
    memory_budget_bytes: int | None = None  # loaded pipelines per actor; default from the device
    job_id: str = ""
    safety_action: str | None = None  # overrides the catalog's safety.action for this job
    pool_options: PoolOptions = field(default_factory=PoolOptions)  # policy overrides, GPU share (memory budget)
    overlap_batches: int = 2  # batches in flight per actor: one renders while the rest finish; 1 = no overlap
    startup_column: bool = False  # results carry STARTUP_COLUMN (the job reads its workers' start-up, then drops it)


STARTUP_COLUMN = "_worker_startup"  # JSON on the first result row an actor returns, null elsewhere


def storage_env() -> dict[str, str]:
    """The driver's store settings (AWS_*, AZURE_*, GOOGLE_*, STORAGE_EMULATOR_HOST, HF_TOKEN...), so actors reach
    the same stores the driver validated against."""
    from storage.stores import ENV_PREFIXES

    return {k: v for k, v in os.environ.items() if k.startswith(ENV_PREFIXES)}


