"""The Ray Data side of a batch job: manifest rows in, result rows out, streamed."""

from __future__ import annotations

import os
from dataclasses import replace
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import ray
from ray.data import ActorPoolStrategy, DataContext, Dataset

from cluster.renderer import Renderer, RendererConfig, storage_env
from cluster.resources import WorkerPlan, plan_workers
from pipelines.catalog import Catalog
from storage.fs import filesystem, is_remote


def prepare_block(batch: pa.Table, finished: pa.Array) -> pa.Table:
    """Drops rows that already have a final result and orders the rest by model and task,
    so that the batches cut from this block rarely switch models."""
    if len(finished):
        batch = batch.filter(pc.invert(pc.is_in(batch["id"], value_set=finished)))
    keys = [(c, "ascending") for c in ("model", "task") if c in batch.column_names]
    return batch.sort_by(keys) if keys and batch.num_rows > 1 else batch


def render_dataset(manifest: str, finished: pa.Array, config: RendererConfig, plan: WorkerPlan, batch_size: int) -> Dataset:
    """Reads the manifest, drops finished rows, and fans the rest out to the renderer actor pool."""
    ctx = DataContext.get_current()
    ctx.enable_progress_bars = False  # the job prints its own progress
    fs, path = filesystem(manifest)
    ds = ray.data.read_parquet(path, filesystem=fs)
    ds = ds.map_batches(prepare_block, fn_kwargs={"finished": finished}, batch_format="pyarrow", batch_size=None)
    return render_step(ds, config, plan, batch_size)


def render_step(ds: Dataset, config: RendererConfig, plan: WorkerPlan, batch_size: int) -> Dataset:
    """The render step itself, shared by the job and the Python API: rows in, one result row per row out."""
    # One Parquet file is one block; small streaming blocks let every actor get rows.
    ds = ds.repartition(target_num_rows_per_block=batch_size)
    return ds.map_batches(
        Renderer,
        fn_constructor_kwargs={"config": config},
        compute=ActorPoolStrategy(size=plan.workers),
        batch_size=batch_size,
        batch_format="pyarrow",
        num_cpus=plan.num_cpus,
        num_gpus=plan.num_gpus or None,
    )


def render(dataset: Dataset, catalog: str, out: str, *, workers: int | None = None, batch_size: int = 8,
           gpus_per_worker: float = 1.0, **options: Any) -> Dataset:
    """Adds rendering to your own Ray Data pipeline: a Dataset of manifest rows in, a Dataset of result rows out.

    Outputs are written under `out` as the rows render; the returned Dataset is lazy like any other
    (consume it, or `write_parquet` it). `options` are RendererConfig fields (limits, input_base, ...).
    """
    Catalog.load(catalog)  # a malformed catalog fails here, not in every actor
    local = {"catalog_path": os.path.abspath(catalog), "out": out if is_remote(out) else os.path.abspath(out)}
    config = RendererConfig(**local, env={**storage_env(), **options.pop("env", {})}, **options)
    plan = plan_workers(ray.cluster_resources(), workers, gpus_per_worker)
    if config.torch_threads is None:
        config = replace(config, torch_threads=plan.torch_threads)
    return render_step(dataset, config, plan, batch_size)
