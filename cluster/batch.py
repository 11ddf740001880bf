"""The Ray Data side of a batch job: manifest rows in, result rows out, streamed."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc
import ray
from ray.data import ActorPoolStrategy, DataContext, Dataset

from cluster.renderer import Renderer, RendererConfig
from cluster.resources import WorkerPlan
from storage.fs import filesystem


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
