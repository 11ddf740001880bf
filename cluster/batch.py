"""The Ray Data side of a batch job: manifest rows in, result rows out, streamed."""

from __future__ import annotations

import os
from dataclasses import replace
from collections.abc import Iterator
from typing import Any

import pyarrow as pa
import pyarrow.dataset as pads
import ray
from ray.data import DataContext, Dataset

from cluster.overlap import render_pool
from cluster.reading import read_parquet_files
from cluster.render_actor import RenderActor
from cluster.renderer_config import RendererConfig, storage_env
from cluster.resources import TASK_CPUS, WorkerPlan, node_resources, plan_workers, thread_env
from pipelines.catalog import Catalog
from storage.fs import filesystem, is_remote
from storage.manifest import open_manifest


def order_block(batch: pa.Table) -> pa.Table:
    """Orders a block's rows by model and task, so that the batches cut from it rarely switch models."""
    keys = [(c, "ascending") for c in ("model", "task") if c in batch.column_names]
    return batch.sort_by(keys) if keys and batch.num_rows > 1 else batch


def small_blocks(ds: Dataset, rows: int) -> Dataset:
    """Ray's streaming repartition into blocks of `rows` rows (so every actor gets some; one Parquet file
    would be one block), its tasks sized like ours: by default each takes a whole CPU, which actors on
    1-CPU nodes leave none of. `Dataset.repartition` does not take resources, hence the logical operator."""
    from ray.data._internal.logical.interfaces import LogicalPlan
    from ray.data._internal.logical.operators import StreamingRepartition

    op = StreamingRepartition(target_num_rows_per_block=rows, input_dependencies=[ds._logical_plan.dag],
                              strict=False, ray_remote_args={"num_cpus": TASK_CPUS})
    return Dataset._from_parent(ds, LogicalPlan(op, ds.context))


def read_manifest(manifest: str) -> Dataset:
    """The manifest's rows as a Dataset, read where they are (local folder or store)."""
    DataContext.get_current().enable_progress_bars = False  # the job prints its own progress
    fs, _ = filesystem(manifest)
    dataset = open_manifest(manifest)
    if isinstance(dataset.format, pads.ParquetFileFormat):
        return read_parquet_files(dataset.files, fs)
    # CSV and JSON Lines: each file scanned at the manifest's column types (storage.manifest decides them).
    files = ray.data.from_arrow(pa.table({"path": dataset.files}))
    return files.map_batches(_scan_files, batch_size=1, batch_format="pyarrow", num_cpus=TASK_CPUS,
                             fn_kwargs={"fs": fs, "file_format": dataset.format, "schema": dataset.schema})


def _scan_files(files: pa.Table, fs: object, file_format: pads.FileFormat, schema: pa.Schema) -> Iterator[pa.Table]:
    for path in files["path"].to_pylist():
        for batch in pads.dataset([path], filesystem=fs, format=file_format, schema=schema).to_batches():
            yield pa.Table.from_batches([batch], schema=schema)


def render_dataset(rows: Dataset, config: RendererConfig, plan: WorkerPlan, batch_size: int) -> Dataset:
    """Fans the rows left to render out to the renderer actor pool, each block ordered by model."""
    ds = rows.map_batches(order_block, batch_format="pyarrow", batch_size=None, num_cpus=TASK_CPUS)
    return render_step(ds, config, plan, batch_size)


def render_step(ds: Dataset, config: RendererConfig, plan: WorkerPlan, batch_size: int) -> Dataset:
    """The render step itself, shared by the job and the Python API: rows in, one result row per row out."""
    ds = small_blocks(ds, batch_size)
    return ds.map_batches(
        RenderActor,
        # Each actor's model memory budget follows its GPU share (0.5 GPU: half the device).
        fn_constructor_kwargs={"config": replace(config, pool_options=replace(config.pool_options, gpu_share=plan.num_gpus or 1.0))},
        # One batch renders while the last is finished; an elastic pool grows as rows queue and nodes join.
        compute=render_pool(plan.workers, config.overlap_batches, plan.max_workers),
        batch_size=batch_size,
        batch_format="pyarrow",
        num_cpus=plan.num_cpus,
        num_gpus=plan.num_gpus or None,
        **({"resources": dict(plan.resources)} if plan.resources else {}),  # e.g. accel=1: the autoscaler adds nodes
        **thread_env(config.torch_threads),
    )



def render(dataset: Dataset, catalog: str, out: str, *, workers: int | None = None, batch_size: int = 8,
           gpus_per_worker: float = 1.0, max_workers: int | None = None,
           worker_resources: dict[str, float] | None = None, **options: Any) -> Dataset:
    """Adds rendering to your own Ray Data pipeline: a Dataset of manifest rows in, a Dataset of result rows out.

    Outputs are written under `out` as the rows render; the returned Dataset is lazy like any other
    (consume it, or `write_parquet` it). `options` are RendererConfig fields (limits, input_base, ...).
    """
    Catalog.load(catalog)  # a malformed catalog fails here, not in every actor
    local = {"catalog_path": os.path.abspath(catalog), "out": out if is_remote(out) else os.path.abspath(out)}
    config = RendererConfig(**local, env={**storage_env(), **options.pop("env", {})}, **options)
    plan = plan_workers(node_resources(), workers, gpus_per_worker, max_workers, worker_resources)
    if config.torch_threads is None:
        config = replace(config, torch_threads=plan.torch_threads)
    return render_step(dataset, config, plan, batch_size)
