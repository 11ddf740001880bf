"""Reading Parquet files as a Dataset through small tasks of our own sizing, rather than Ray Data's
file listing, whose whole-CPU task never starts on nodes that actors have filled."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pyarrow as pa
import pyarrow.parquet as pq
import ray
from ray.data import Dataset

from cluster.resources import TASK_CPUS

READ_ROWS = 65_536  # rows per block read from a file

Shape = Callable[[pa.Table, int, int], pa.Table]
"""Applied to each block read: (rows, the file's position in the list, the block's first row in its file)."""


def _read(files: pa.Table, fs: object, columns: list[str] | None, shape: Shape | None) -> Iterator[pa.Table]:
    for path, order in zip(files["path"].to_pylist(), files["order"].to_pylist()):
        first = 0
        with fs.open_input_file(path) as f:  # type: ignore[attr-defined]
            parquet = pq.ParquetFile(f)
            wanted = None if columns is None else [c for c in columns if c in parquet.schema_arrow.names]
            for batch in parquet.iter_batches(batch_size=READ_ROWS, columns=wanted):
                table = pa.Table.from_batches([batch], schema=batch.schema)
                yield table if shape is None else shape(table, order, first)
                first += table.num_rows


def read_parquet_files(paths: list[str], fs: object, columns: list[str] | None = None,
                       shape: Shape | None = None) -> Dataset:
    """The rows of `paths` (within the pyarrow filesystem `fs`), file by file, in blocks of READ_ROWS."""
    files = ray.data.from_arrow(pa.table({"path": paths, "order": list(range(len(paths)))}))
    return files.map_batches(_read, batch_size=1, batch_format="pyarrow", num_cpus=TASK_CPUS,
                             fn_kwargs={"fs": fs, "columns": columns, "shape": shape})
