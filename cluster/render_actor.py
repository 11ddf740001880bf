"""The class Ray Data's actor pool runs. It imports the renderer (torch, diffusers, the pipelines) inside the
actor, so the driver that plans the job never does: that import is seconds of every job's start-up."""

from __future__ import annotations

import json
import threading
import time
from typing import Any

import psutil
import pyarrow as pa

from cluster.renderer_config import STARTUP_COLUMN, RendererConfig


class RenderActor:
    """A `cluster.renderer.Renderer` built in the actor; each batch of manifest rows in, its result rows out."""

    def __init__(self, config: RendererConfig):
        began = time.time()
        from cluster.renderer import Renderer

        self.renderer = Renderer(config)
        # Durations on this node's own clock, so nodes' clock skew never enters the job's start-up figures.
        self.startup: dict[str, Any] | None = {
            "process_s": began - psutil.Process().create_time(),  # the worker process's start, Ray's import
            "init_s": time.time() - began,  # torch, diffusers and the renderer (no model yet)
        } if config.startup_column else None
        self._lock = threading.Lock()

    def __call__(self, batch: Any) -> Any:
        if self.startup is None:
            return self.renderer(batch)
        started = time.time()
        results = self.renderer(batch)
        column: list[str | None] = [None] * results.num_rows
        with self._lock:  # two batches are in flight: the first to return reports
            figures, self.startup = (self.startup, {}) if results.num_rows else ({}, self.startup)
        if figures:  # this actor's first results: its model loads and its first batch, as it saw them
            loads = self.renderer.pool.figures
            column[0] = json.dumps(dict(figures, first_batch_s=time.time() - started, worker=self.renderer.worker,
                                        model_load_s=sum(f.get("load_s") or 0.0 for f in loads.values())))
        return results.append_column(STARTUP_COLUMN, pa.array(column, pa.string()))
