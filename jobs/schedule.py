"""`renderfleet schedule`: list fire times, expand a fire's manifest (a dry run with counts and an estimate),
run one fire, and write the Kubernetes manifests that run a spec on KubeRay."""

from __future__ import annotations

import argparse
import os
import sys
from collections import Counter
from collections.abc import Iterator
from datetime import datetime
from typing import TYPE_CHECKING, Any

from jobs.exits import UsageError

if TYPE_CHECKING:  # the command line imports this module for its parser: heavy imports wait for a command
    import pyarrow as pa

    from jobs.specs import Spec

BATCH_ROWS = 4096  # product rows per expansion batch: memory stays bounded whatever the table's size
MANIFEST_NAME = "_spec/manifest.parquet"  # where a fire keeps the manifest it rendered, under its prefix


def read_products(uri: str) -> Iterator[list[dict[str, Any]]]:
    """The product table (Parquet or CSV, local or in a store) in batches; CSV cells stay text as written."""
    import pyarrow as pa
    import pyarrow.csv as pacsv
    import pyarrow.dataset as pads

    from storage.fs import filesystem

    fs, path = filesystem(uri)
    try:
        if uri.lower().endswith(".csv"):
            names = pads.dataset(path, filesystem=fs, format="csv").schema.names
            fmt = pads.CsvFileFormat(convert_options=pacsv.ConvertOptions(column_types={n: pa.string() for n in names}))
            dataset = pads.dataset(path, filesystem=fs, format=fmt)
        else:
            dataset = pads.dataset(path, filesystem=fs, format="parquet")
        for batch in dataset.to_batches(batch_size=BATCH_ROWS):
            yield batch.to_pylist()
    except FileNotFoundError:
        raise UsageError(f"product table not found: {uri}") from None
    except pa.ArrowInvalid as e:
        raise UsageError(f"product table {uri} is not readable Parquet or CSV: {e}") from None


def _schema(rows: list[dict[str, Any]]) -> pa.Schema:
    import pyarrow as pa

    from storage.manifest import column_types

    types = {**column_types(), "product_key": pa.string(), "prompt_template": pa.string()}
    names = list(dict.fromkeys(k for r in rows[:1] for k in r))
    return pa.schema([pa.field(n, types.get(n) or pa.array([r.get(n) for r in rows[:1]]).type) for n in names])


def write_manifest(spec: Spec, dest: str) -> tuple[int, Counter[str]]:
    """Writes the manifest a fire renders to `dest` (streamed, appearing whole); rows and rows per model."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from jobs.specs import expand_rows
    from storage.fs import atomic_output
    from storage.manifest import check_schema, open_manifest

    per_model: Counter[str] = Counter()
    total = 0
    if spec.template is None:
        assert spec.manifest_uri
        dataset = open_manifest(spec.manifest_uri)
        check_schema(dataset.schema)
        batches = (b.to_pylist() for b in dataset.to_batches(batch_size=BATCH_ROWS))
        schema = dataset.schema
    else:
        batches = expand_rows(spec.template, read_products(spec.template.products), spec.template.products)
        schema = None
    writer = None
    try:
        with atomic_output(dest) as sink:
            for rows in batches:
                if not rows:
                    continue
                schema = schema or _schema(rows)
                writer = writer or pq.ParquetWriter(sink, schema)
                table = pa.Table.from_pylist(rows, schema=schema)
                writer.write_table(table)
                total += table.num_rows
                per_model.update(str(m) for m in (table["model"].to_pylist() if "model" in table.column_names
                                                   else [None] * table.num_rows))
            if writer is None:
                raise UsageError(f"{spec.path}: the fire expands to no rows (is the product table empty?)")
            writer.close()
    except ValueError as e:
        if isinstance(e, UsageError):
            raise
        raise UsageError(str(e)) from None
    if spec.template is not None:
        check_schema(schema)
    return total, per_model


def estimate(spec: Spec, at: datetime, rows: int) -> str:
    """How long `rows` rows should take, from the rate of the latest run of this fire or the one before."""
    from storage.results import latest_run

    for prefix in (spec.prefix(at), spec.prefix(spec.previous_fire(at))):
        try:
            run = latest_run(prefix)
        except (OSError, ValueError):
            run = None
        rate = (run or {}).get("rows_per_s") or 0.0
        if rate > 0:
            seconds = rows / rate
            return (f"estimate: {_duration(seconds)} at {rate:.2f} rows/s on {run.get('workers', '?')} workers "
                    f"(run {run.get('run_id')} under {prefix})")
    return "estimate: no earlier run of this spec to go by"


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.0f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"


def _load(path: str) -> Spec:
    from jobs.specs import SpecError, load_spec

    try:
        return load_spec(path)
    except SpecError as e:
        raise UsageError(str(e)) from None


def _at(spec: Spec, text: str | None) -> datetime:
    from jobs.specs import parse_time

    try:
        return parse_time(text or "now", spec.timezone)
    except ValueError as e:
        raise UsageError(f"--at: {e}") from None


def cmd_next(args: argparse.Namespace) -> int:
    spec = _load(args.spec)
    after = _at(spec, args.after)
    for t in spec.fire_times(after, args.n):
        print(f"{t.isoformat()}  {spec.prefix(t)}")
    return 0


def cmd_expand(args: argparse.Namespace) -> int:
    spec = _load(args.spec)
    at = _at(spec, args.at)
    dest = args.manifest or f"{spec.name}-{at:%Y%m%dT%H%M}.parquet"
    total, per_model = write_manifest(spec, dest)
    print(f"fire {at.isoformat()} -> {spec.prefix(at)}")
    print(f"manifest: {dest} ({total} rows)")
    for model, n in sorted(per_model.items()):
        print(f"  {model}: {n} rows")
    print(estimate(spec, at, total))
    return 0


def fire_job(spec: Spec, at: datetime, address: str | None = None):
    """The RenderJob one fire runs: its manifest written under its prefix, the spec's catalog and settings."""
    from jobs.render import RenderJob
    from storage.fs import join
    from storage.params import Limits

    out = spec.prefix(at)
    manifest = spec.manifest_uri
    if spec.template is not None:
        manifest = join(out, MANIFEST_NAME)
        write_manifest(spec, manifest)
    r = spec.render
    return RenderJob(manifest=manifest, out=out, catalog=spec.catalog, address=address, workers=r.get("workers"),
                     batch_size=r.get("batch_size", 8), safety_action=spec.safety_action,
                     limits=Limits(**{k: r[k] for k in ("max_steps", "max_pixels") if k in r}))


def cmd_run(args: argparse.Namespace) -> int:
    from jobs.render import run
    from storage.manifest import ManifestError

    spec = _load(args.spec)
    at = _at(spec, args.at)
    print(f"fire {at.isoformat()} -> {spec.prefix(at)}")
    try:
        job = fire_job(spec, at, args.address)
    except ManifestError as e:
        raise UsageError(str(e)) from None
    report = run(job)
    tolerated = spec.render.get("max_failed_fraction", 0.0)
    for line in report.lines():
        print(line)
    print(report.verdict(tolerated))
    return report.exit_status(tolerated)


def cmd_render_k8s(args: argparse.Namespace) -> int:
    from jobs.k8s import render_k8s

    spec = _load(args.spec)
    text = render_k8s(spec, image=args.image)
    if args.out in (None, "-"):
        sys.stdout.write(text)
    else:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w", encoding="utf-8") as f:
            f.write(text)
        print(f"wrote {args.out}")
    return 0


def add_parser(sub: argparse._SubParsersAction, make) -> None:
    """Adds `schedule` and its subcommands (make: the CLI's subparser factory, for one help style)."""
    s = make(sub, "schedule", "scheduled jobs from a YAML spec: fire times, dry runs, one fire, Kubernetes manifests")
    ssub = s.add_subparsers(dest="schedule_command", required=True)
    n = make(ssub, "next", "list the next fire times and their output prefixes")
    n.add_argument("spec", help="job spec YAML")
    n.add_argument("-n", type=int, default=5, help="how many fire times")
    n.add_argument("--after", help="list fires after this time (ISO 8601, @EPOCH; default: now)")
    n.set_defaults(func=cmd_next)
    e = make(ssub, "expand", "write the manifest a fire would render, with rows per model and a time estimate (renders nothing)")
    e.add_argument("spec", help="job spec YAML")
    e.add_argument("--at", help="the fire time (ISO 8601; without an offset, in the spec's time zone; default: now)")
    e.add_argument("--manifest", help="where to write it (default: NAME-YYYYmmddTHHMM.parquet here)")
    e.set_defaults(func=cmd_expand)
    r = make(ssub, "run", "run one fire now (resumes into the fire's prefix if it ran before)")
    r.add_argument("spec", help="job spec YAML")
    r.add_argument("--at", help="the fire time the run renders as (default: now)")
    r.add_argument("--address", help="Ray cluster address (default: $RAY_ADDRESS, else a local cluster)")
    r.add_argument("--verbose", action="store_true", help="show every third-party warning (default: known-harmless ones hidden)")
    r.set_defaults(func=cmd_run)
    k = make(ssub, "render-k8s", "write the Kubernetes manifests (CronJob -> RayJob) that run the spec on KubeRay")
    k.add_argument("spec", help="job spec YAML")
    k.add_argument("--out", help="file to write (default: standard output)")
    k.add_argument("--image", help="renderfleet container image (default: the spec's kubernetes.image, else infra/rayjob.yaml's)")
    k.set_defaults(func=cmd_render_k8s)


