"""Dataset exports as a Ray Data job: the compacted results' `ok` rows, hash-sharded by id, each shard
written by one task that streams the rendered files into a Hugging Face Parquet shard or a WebDataset tar.

Shards are chosen by a hash of the id and sorted by id, so an export of the same results writes the same
shards (tar members carry fixed times and owners: byte-identical), and a rerun into the same DEST replaces
them whole and removes shards an earlier, larger export left.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import tarfile
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray
from ray.data import DataContext

from cluster.ledger import compact
from cluster.resources import TASK_CPUS
from storage.fs import atomic_output, delete, filesystem, join, list_files, read_bytes, write_bytes
from storage.ledger import RANK
from storage.results import COMPACTED, absolute_uri, results_dir
from storage.stores import ENV_PREFIXES

SHARD = "_renderfleet_shard"
MAX_PARTITIONS = 200  # shuffle partitions at most (Ray's default); fewer when there are fewer shards
STAGING = "_staging"  # hf shards are written here, then renamed into data/
ROW_GROUP_ROWS = 100  # rows per Parquet row group: media rows are large, readers fetch a group at a time
# Result columns about the run rather than the sample: not exported.
OPERATIONAL = {"status", "output_uri", "error", "render_s", "worker", "model_loads", "filter_reason", "nsfw",
               "safety_action", "watermark", "c2pa", "image_uri", "mask_uri", "control_image_uris", RANK}
MEDIA_COLUMN = {"image": "image", "edit": "image", "video": "video", "audio": "audio", "mesh": "mesh"}
FEATURE_TYPE = {"image": "Image", "video": "Video", "audio": "Audio", "mesh": "Mesh"}
MEDIA_TYPE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])  # what datasets' media features store


class _Hashing:
    """A write-only stream that hashes and counts what passes through to `sink`."""

    def __init__(self, sink: Any) -> None:
        self.sink, self.sha, self.size, self.closed = sink, hashlib.sha256(), 0, False

    def write(self, data: bytes) -> int:
        self.sha.update(data)
        self.size += len(data)
        self.sink.write(data)
        return len(data)

    def tell(self) -> int:
        return self.size

    def flush(self) -> None:
        pass

    def close(self) -> None:
        self.closed = True


def _ok_status(table: pa.Table) -> pa.Table:
    return table.filter(pc.equal(table["status"], "ok"))


def _ok_rows(table: pa.Table, shards: int) -> pa.Table:
    table = table.filter(pc.equal(table["status"], "ok"))
    shard = [int.from_bytes(hashlib.sha256(i.encode()).digest()[:8], "big") % shards for i in table["id"].to_pylist()]
    return table.append_column(SHARD, pa.array(shard, pa.int64()))


def _value_feature(t: pa.DataType) -> Any:
    """The `datasets` feature (as its JSON) of a plain Arrow column, as datasets itself would infer it."""
    if pa.types.is_struct(t):
        return {t.field(i).name: _value_feature(t.field(i).type) for i in range(t.num_fields)}
    if pa.types.is_list(t) or pa.types.is_large_list(t):
        return {"feature": _value_feature(t.value_type), "_type": "LargeList" if pa.types.is_large_list(t) else "List"}
    names = {pa.string(): "string", pa.large_string(): "large_string", pa.bool_(): "bool", pa.binary(): "binary",
             pa.large_binary(): "large_binary", pa.null(): "null", pa.float16(): "float16", pa.float32(): "float32",
             pa.float64(): "float64", pa.date32(): "date32", pa.date64(): "date64"}
    dtype = names.get(t) or str(t)  # int64, float32, timestamp[us, tz=UTC], ...
    return {"dtype": dtype, "_type": "Value"}


def hf_schema(schema: pa.Schema, tasks: list[str]) -> pa.Schema:
    """The exported columns: id, task, one media column per kind present, the rest of the sample's columns;
    the `huggingface` metadata names their `datasets` features (Image, Video, Audio, Mesh, Value...)."""
    media = sorted({MEDIA_COLUMN[t] for t in tasks if t in MEDIA_COLUMN})
    rest = [f for f in schema if f.name not in OPERATIONAL and f.name not in ("id", "task", SHARD, *media)]
    fields = [schema.field("id"), schema.field("task"), *(pa.field(m, MEDIA_TYPE) for m in media), *rest]
    features = {f.name: ({"_type": FEATURE_TYPE[f.name]} if f.name in media else _value_feature(f.type)) for f in fields}
    return pa.schema(fields).with_metadata({"huggingface": json.dumps({"info": {"features": features}})})


def _media(row: dict[str, Any], out: str) -> tuple[str, bytes]:
    """The rendered file's name (its extension tells decoders the format) and bytes."""
    uri = absolute_uri(out, row["output_uri"])
    return os.path.basename(uri), read_bytes(uri)


def _setup(env: dict[str, str]) -> None:
    os.environ.update(env)  # the driver's store settings, for tasks on other nodes


def _write_hf(group: pa.Table, out: str, dest: str, shards: int, schema: pa.Schema, env: dict[str, str]) -> pa.Table:
    _setup(env)
    k = group[SHARD][0].as_py()
    group = group.sort_by("id")
    name = f"{STAGING}/part-{k:05d}.parquet"  # renamed to data/train-0000K-of-0000N once N (non-empty shards) is known
    media = [f.name for f in schema if f.type == MEDIA_TYPE and f.name in FEATURE_TYPE]
    with atomic_output(join(dest, name)) as sink:
        stream = _Hashing(sink)
        with pq.ParquetWriter(stream, schema) as writer:
            for start in range(0, group.num_rows, ROW_GROUP_ROWS):
                rows = group.slice(start, ROW_GROUP_ROWS).to_pylist()
                columns: dict[str, list[Any]] = {m: [None] * len(rows) for m in media}
                for i, row in enumerate(rows):
                    path, data = _media(row, out)
                    columns[MEDIA_COLUMN[row["task"]]][i] = {"bytes": data, "path": path}
                table = {f.name: columns[f.name] if f.name in columns else [r.get(f.name) for r in rows] for f in schema}
                writer.write_table(pa.Table.from_pydict(table, schema=schema), row_group_size=ROW_GROUP_ROWS)
    return _stat(name, group, stream)


def _stat(name: str, group: pa.Table, stream: _Hashing) -> pa.Table:
    models = {str(k): v for k, v in _counts(group, "model").items()}
    return pa.table({"name": [name], "rows": [group.num_rows], "bytes": [stream.size], "sha256": [stream.sha.hexdigest()],
                     "by_model": [json.dumps(models)], "by_task": [json.dumps(_counts(group, "task"))]})


def _counts(group: pa.Table, column: str) -> dict[str, int]:
    if column not in group.column_names:
        return {}
    return {str(r["values"]): r["counts"] for r in pc.value_counts(group[column]).to_pylist()}


def _member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode, info.uid, info.gid, info.uname, info.gname = len(data), 0, 0o644, 0, 0, "", ""
    tar.addfile(info, io.BytesIO(data))


def _write_wds(group: pa.Table, out: str, dest: str, prefix: str, env: dict[str, str]) -> pa.Table:
    _setup(env)
    k = group[SHARD][0].as_py()
    group = group.sort_by("id").drop_columns([c for c in (SHARD, RANK) if c in group.column_names])
    # Keys are shard and sequence numbers: WebDataset splits a member name at its first dot, and ids may hold dots.
    keys = [f"{k:06d}_{i:06d}" for i in range(group.num_rows)]
    name = f"{prefix}-{k:06d}.tar"
    with atomic_output(join(dest, name)) as sink:
        stream = _Hashing(sink)
        with tarfile.open(fileobj=stream, mode="w|", format=tarfile.PAX_FORMAT) as tar:
            for key, row in zip(keys, group.to_pylist()):
                path, data = _media(row, out)
                _member(tar, f"{key}{os.path.splitext(path)[1].lower()}", data)
                _member(tar, f"{key}.json", json.dumps({"key": key, **row}, default=str, ensure_ascii=False).encode())
                _member(tar, f"{key}.txt", (row.get("prompt") or "").encode())
    sink_meta = io.BytesIO()
    pq.write_table(group.add_column(0, "key", pa.array(keys)), sink_meta)  # the shard's rows beside it
    write_bytes(join(dest, f"{prefix}-{k:06d}.parquet"), sink_meta.getvalue())
    return _stat(name, group, stream)


def export(out: str, dest: str, fmt: str, shard_rows: int, name: str = "shard") -> dict[str, Any]:
    """Compacts OUT's results, then writes its `ok` rows to DEST as `hf` Parquet shards or `webdataset` tars.

    Returns the statistics (rows, shards with rows, bytes and sha256, rows per model and task); the caller
    writes the dataset card and `_stats.json`."""
    DataContext.get_current().enable_progress_bars = False
    compact(out)  # one row per id, even after a killed run
    fs, path = filesystem(join(results_dir(out), COMPACTED))
    env = {k: v for k, v in os.environ.items() if k.startswith(ENV_PREFIXES)}
    results = ray.data.read_parquet(path, filesystem=fs, num_cpus=TASK_CPUS)
    ok = results.select_columns(["status", "task"]).map_batches(_ok_status, batch_format="pyarrow", batch_size=None,
                                                                 num_cpus=TASK_CPUS)
    tasks = {r["task"]: r["count()"] for r in ok.groupby("task", num_partitions=1).count().take_all()}
    total = sum(tasks.values())
    shards = max(1, -(-total // shard_rows)) if total else 0
    files: list[dict[str, Any]] = []
    if total:
        rows = results.map_batches(_ok_rows, batch_format="pyarrow", batch_size=None, num_cpus=TASK_CPUS,
                                   fn_kwargs={"shards": shards})
        groups = rows.groupby(SHARD, num_partitions=min(shards, MAX_PARTITIONS))  # not Ray's 200 for a few shards
        if fmt == "hf":
            schema = hf_schema(results.schema().base_schema, sorted(tasks))
            written = groups.map_groups(_write_hf, batch_format="pyarrow", num_cpus=TASK_CPUS,
                                        fn_kwargs={"out": out, "dest": dest, "shards": shards, "schema": schema, "env": env})
        else:
            written = groups.map_groups(_write_wds, batch_format="pyarrow", num_cpus=TASK_CPUS,
                                        fn_kwargs={"out": out, "dest": dest, "prefix": name, "env": env})
        files = sorted(written.take_all(), key=lambda r: r["name"])
        if fmt == "hf":
            files = _publish(dest, files)
    _remove_stale(dest, fmt, name, {f["name"] for f in files})
    by_model: dict[str, int] = {}
    for f in files:
        for model, n in json.loads(f.pop("by_model")).items():
            by_model[model] = by_model.get(model, 0) + n
        f.pop("by_task")
    return {"format": fmt, "source": out, "rows": total, "shards": len(files), "by_task": tasks,
            "by_model": dict(sorted(by_model.items())), "files": files}


def _publish(dest: str, files: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Moves staged hf shards to data/train-0000K-of-0000N.parquet, numbered in shard order (a hash bucket can
    be empty, so N is known only now)."""
    fs, data = filesystem(join(dest, "data"))
    fs.create_dir(data, recursive=True)
    for i, f in enumerate(files):
        final = f"data/train-{i:05d}-of-{len(files):05d}.parquet"
        fs.move(filesystem(join(dest, f["name"]))[1], filesystem(join(dest, final))[1])
        f["name"] = final
    with contextlib.suppress(OSError):  # the emptied staging folder (stores have no empty folders)
        fs.delete_dir(filesystem(join(dest, STAGING))[1])
    return files


def _remove_stale(dest: str, fmt: str, name: str, keep: set[str]) -> None:
    """Deletes shards of an earlier export into DEST that this one did not write (it had more shards)."""
    try:
        found = list_files(join(dest, "data") if fmt == "hf" else dest)
    except FileNotFoundError:
        return
    base = join(dest)
    for uri in found:
        rel = uri[len(base):].lstrip("/")
        ours = (rel.startswith("data/train-") and rel.endswith(".parquet")) if fmt == "hf" else \
            ("/" not in rel and rel.startswith(f"{name}-") and rel.endswith((".tar", ".parquet")))
        if ours and rel not in keep and rel.replace(".parquet", ".tar") not in keep:
            delete(uri)
