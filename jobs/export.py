"""`renderfleet export OUT --format hf|webdataset DEST`: a render's `ok` outputs as a dataset others can load,
with `_stats.json` (rows, shards, checksums) and, for hf, a README.md dataset card naming models and licences."""

from __future__ import annotations

import argparse
import json
from typing import Any

from jobs.exits import UsageError

FORMATS = ("hf", "webdataset")


def dataset_card(stats: dict[str, Any], licences: dict[str, str | None]) -> str:
    """The hf dataset card: front matter that points `datasets` at the shards, then models, counts and licences."""
    known = sorted({lic for lic in licences.values() if lic})
    front = ["---", "configs:", "- config_name: default", "  data_files:", "  - split: train",
             "    path: data/train-*.parquet"]
    if len(known) == 1:
        front.append(f"license: {known[0]}")
    elif known:
        front += ["license: other", "license_details: " + json.dumps("; ".join(known))]
    front += ["tags:", "- synthetic", "- renderfleet", "---", ""]
    lines = [
        "# Rendered dataset", "",
        f"{stats['rows']} samples rendered by renderfleet from `{stats['source']}`, in {stats['shards']} Parquet shards "
        "(`data/train-*.parquet`). Only rows whose status was `ok` are included; every output carries an invisible "
        "watermark and provenance metadata where its format allows.", "",
        "```python", "from datasets import load_dataset",
        'ds = load_dataset("parquet", data_files="data/train-*.parquet", split="train")', "```", "",
        "| model | samples | licence |", "|---|---|---|",
        *(f"| {m} | {n} | {licences.get(m) or 'unknown (no `license` in the catalog)'} |"
          for m, n in stats["by_model"].items()),
        "", "| task | samples |", "|---|---|", *(f"| {t} | {n} |" for t, n in sorted(stats["by_task"].items())), "",
        "Media columns use the `datasets` features `Image`, `Video`, `Audio` and `Mesh`. Decoding `Video` and "
        "`Audio` needs `torchcodec`; `Mesh` decodes glb, gltf, ply and stl (cast an obj column with "
        "`Mesh(decode=False)` to read its bytes).", "",
    ]
    return "\n".join(front + lines)


def _licences(catalog: str | None, models: list[str]) -> dict[str, str | None]:
    if not catalog:
        return {m: None for m in models}
    from pipelines.catalog import Catalog, CatalogError

    try:
        cat = Catalog.load(catalog)
    except CatalogError as e:
        raise UsageError(str(e)) from None
    return {m: cat.models[m].license if m in cat.models else None for m in models}


def run_export(out: str, fmt: str, dest: str, shard_rows: int = 1000, name: str = "shard", catalog: str | None = None,
               address: str | None = None) -> dict[str, Any]:
    """Runs the export job and writes `_stats.json` (and the hf card); returns the statistics."""
    from cluster.export import export
    from cluster.runtime import connect
    from storage.fs import join, write_bytes

    connect(address)
    stats = export(out, dest, fmt, shard_rows, name)
    if fmt == "hf":
        card = dataset_card(stats, _licences(catalog, list(stats["by_model"])))
        write_bytes(join(dest, "README.md"), card.encode(), content_type="text/markdown")
    write_bytes(join(dest, "_stats.json"), json.dumps(stats, indent=1).encode(), content_type="application/json")
    return stats


def cmd_export(args: argparse.Namespace) -> int:
    from storage.fs import check_uri
    from storage.results import has_results

    if args.shard_rows < 1:
        raise UsageError(f"--shard-rows must be at least 1, got {args.shard_rows}")
    if "/" in args.name or "." in args.name or not args.name:
        raise UsageError(f"--name {args.name!r}: shard names take no '/' or '.'")
    try:
        check_uri(args.out, "OUT")
        check_uri(args.dest, "DEST", write=True)
    except ValueError as e:
        raise UsageError(str(e)) from None
    if not has_results(args.out):
        raise UsageError(f"{args.out}: no results here; give the --out of a render")
    stats = run_export(args.out, args.format, args.dest, args.shard_rows, args.name, args.catalog, args.address)
    print(f"exported {stats['rows']} ok rows in {stats['shards']} shards to {args.dest}")
    for model, n in stats["by_model"].items():
        print(f"  {model}: {n}")
    return 0


def add_parser(sub: argparse._SubParsersAction, make) -> None:
    """Adds `export` (make: the CLI's subparser factory, for one help style)."""
    e = make(sub, "export", "write a render's ok outputs as a dataset: Hugging Face Parquet shards or WebDataset tars")
    e.add_argument("out", help="the --out of a render (local dir or store prefix)")
    e.add_argument("--format", choices=FORMATS, required=True, help="hf: data/train-*.parquet + README.md card; "
                   "webdataset: NAME-000000.tar + a Parquet of each shard's rows (required, no default)")
    e.add_argument("dest", help="where to write the dataset (local dir or store prefix); a rerun replaces it")
    e.add_argument("--shard-rows", type=int, default=1000, help="rows per shard (shards are cut by a hash of the id, "
                   "so sizes vary a little)")
    e.add_argument("--name", default="shard", help="webdataset shard name: NAME-000000.tar")
    e.add_argument("--catalog", help="the render's catalog, for each model's licence in the card (default: "
                                     "licences shown as unknown)")
    e.add_argument("--address", help="Ray cluster address (default: $RAY_ADDRESS, else a local cluster)")
    e.set_defaults(func=cmd_export)
