"""Property-based manifests through the real job on the real local Ray cluster.

Arbitrary ids, values and (sometimes) column types: the job either refuses the manifest up front
with a ManifestError, or finishes with exactly one final result per id. The seed is printed;
rerun with RENDERFLEET_FUZZ_SEED=<seed> to reproduce a failure.
"""

from __future__ import annotations

import math
import os
import random
import shutil
import tempfile

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis import strategies as st

from jobs.render import RenderJob, run
from storage.manifest import ManifestError
from storage.results import STATUSES, read_results

pytestmark = pytest.mark.timeout(600)

SEED = int(os.environ.get("RENDERFLEET_FUZZ_SEED") or random.SystemRandom().randrange(2**32))
EXAMPLES = int(os.environ.get("RENDERFLEET_FUZZ_MANIFESTS", "8"))
TRIED = {"manifests": 0, "rows": 0, "refused": 0}

ADVERSARIAL_IDS = ["../../etc/passwd", "a/b", ".", "..", ".hidden", "~", "%2E", "%7E", "CON", "a" * 500,
                   "!" + "a" * 217, "!" + "a" * 77 + "~230d3693fce2e0fadf3f45cf4562cefa", "ü-ñ", "\u202e", "x\x00y"]
# s3:// URIs reach the test's own S3 server on 127.0.0.1 (the s3_server fixture sets the endpoint).
URIS = [None, "/etc/passwd", "/proc/self/environ", "../x.png", "nope.png", "", "s3://", "s3://no-bucket/x.png", "/dev/zero", "."]

ids = st.lists(st.one_of(st.sampled_from(ADVERSARIAL_IDS), st.text(min_size=1, max_size=40)), min_size=1, max_size=8, unique=True)
values = {
    "task": st.one_of(st.none(), st.sampled_from(["image", "edit", "video", "mesh", "audio", "", "IMAGE", "nope"])),
    "model": st.one_of(st.none(), st.sampled_from(["tiny-sd", "tiny-sdxl", "tiny-sd-img2img", "no-such", "tiny-lora-sd", ""])),
    "prompt": st.one_of(st.none(), st.text(max_size=60), st.just("x" * 10_001)),
    "seed": st.one_of(st.none(), st.integers(-2**63, 2**63 - 1)),
    "num_inference_steps": st.one_of(st.none(), st.integers(-3, 3), st.integers(-2**62, 2**62)),
    "guidance_scale": st.one_of(st.none(), st.floats(allow_nan=True, allow_infinity=True)),
    "width": st.one_of(st.none(), st.sampled_from([0, -8, 8, 64, 65, 2**31, -2**40])),
    "height": st.one_of(st.none(), st.sampled_from([64, 7, 2**40])),
    "output_format": st.one_of(st.none(), st.sampled_from(["png", "jpg", "JPEG", "webp", "mp4", "bmp", ""])),
    "image_uri": st.sampled_from(URIS),
    "strength": st.one_of(st.none(), st.floats(-1, 2)),
}
TYPES = {"task": pa.string(), "model": pa.string(), "prompt": pa.string(), "seed": pa.int64(), "num_inference_steps": pa.int64(),
         "guidance_scale": pa.float64(), "width": pa.int64(), "height": pa.int64(), "output_format": pa.string(),
         "image_uri": pa.string(), "strength": pa.float64()}
# Sometimes a column of the wrong type, which must be refused before anything renders.
WRONG_TYPES = {"seed": pa.string(), "width": pa.float64(), "prompt": pa.int64()}


@st.composite
def manifests(draw) -> tuple[pa.Table, bool]:
    row_ids = draw(ids)
    columns = draw(st.lists(st.sampled_from(sorted(values)), unique=True, max_size=len(values)))
    if "prompt" not in columns:
        columns.append("prompt")
    rows = [{"id": i, **{c: draw(values[c]) for c in columns}} for i in row_ids]
    for r in rows:  # keep valid rows cheap
        if r.get("num_inference_steps") is None:
            r["num_inference_steps"] = 1
    columns.append("num_inference_steps")
    wrong = draw(st.sampled_from([None, None, None, *WRONG_TYPES]))
    fields = [pa.field("id", pa.string())]
    for c in dict.fromkeys(columns):
        fields.append(pa.field(c, WRONG_TYPES[c] if c == wrong else TYPES[c]))
    fields.append(pa.field("_order", pa.string()))  # a carried column named like an internal one
    data = {f.name: [_cast(r.get(f.name, f"o{k}"), f.type) for k, r in enumerate(rows)] for f in fields}
    data["id"] = row_ids
    return pa.table(data, schema=pa.schema(fields)), wrong is not None


def _cast(v, t: pa.DataType):
    if v is None:
        return None
    if pa.types.is_string(t):
        return str(v)
    if pa.types.is_floating(t):
        return float(v) if not isinstance(v, str) else 1.5
    if pa.types.is_integer(t):
        return v if isinstance(v, int) and not isinstance(v, bool) else 3 if isinstance(v, str) else int(v) if math.isfinite(v) else 0
    return v


def test_print_seed():
    print(f"\nmanifest fuzz seed: RENDERFLEET_FUZZ_SEED={SEED} ({EXAMPLES} manifests)")


@seed(SEED)
# No shrinking: each example is a whole job; the printed seed reproduces a failure.
@settings(max_examples=EXAMPLES, deadline=None, database=None, suppress_health_check=list(HealthCheck),
          phases=[Phase.explicit, Phase.generate])
@given(manifests())
def test_the_job_never_dies_and_every_row_ends_final(ray_cluster, tiny_catalog, s3_server, case):
    table, refusable = case
    folder = tempfile.mkdtemp(prefix="rf-fuzz-")
    try:
        manifest = os.path.join(folder, "manifest.parquet")
        pq.write_table(table, manifest)
        out = os.path.join(folder, "out")
        TRIED["manifests"] += 1
        TRIED["rows"] += table.num_rows
        try:
            report = run(RenderJob(manifest, out, catalog=tiny_catalog, workers=1, batch_size=4, address=ray_cluster))
        except ManifestError:
            assert refusable, "a manifest of well-typed columns was refused"
            TRIED["refused"] += 1
            return
        results = read_results(out)
        assert sorted(results["id"].to_pylist()) == sorted(table["id"].to_pylist())
        assert set(results["status"].to_pylist()) <= set(STATUSES)
        assert sum(report.counts.values()) == table.num_rows
        failed = [r for r in results.to_pylist() if r["status"] == "failed"]
        assert all(r["error"] and ":" in r["error"] for r in failed)
        assert not any("internal_error" in r["error"] for r in failed), failed
        carried = dict(zip(table["id"].to_pylist(), table["_order"].to_pylist()))
        assert {r["id"]: r["_order"] for r in results.to_pylist()} == carried
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def test_print_counts():
    print(f"\nmanifest fuzz: {TRIED['manifests']} manifests, {TRIED['rows']} rows, {TRIED['refused']} refused up front "
          f"(seed {SEED})")
