"""Overlap: a renderer renders the next batch while the previous one is checked, encoded and written.

Real tiny models and a real local store; the stand-in renderer sleeps instead of computing (an accelerator
that leaves the CPU free), so finishing can actually run beside the pipeline call. Ordering, never durations.
"""

from __future__ import annotations

import hashlib
import os
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from cluster.overlap import intervals
from cluster.renderer import Renderer, RendererConfig
from storage.keys import output_key
from storage.results import absolute_uri

pytestmark = [pytest.mark.timeout(300), pytest.mark.usefixtures("one_torch_thread")]


class StandInRenderer(Renderer):
    """The real renderer with the pipeline call replaced by a wait: the latency of an accelerator, no CPU."""

    latency_s = 0.05

    def _call(self, task: str, stages: list[tuple[Any, dict[str, Any]]], requests: list[Any]) -> list[Any]:
        time.sleep(self.latency_s)
        shared = stages[0][1]
        return [Image.fromarray(np.random.default_rng(r.seed).integers(0, 255, (shared["height"], shared["width"], 3),
                                                                       dtype=np.uint8)) for r in requests]


def rows(n: int, prefix: str = "r", size: int = 64) -> list[dict[str, Any]]:
    return [{"id": f"{prefix}-{i}", "prompt": f"a harbour at dawn {i}", "width": size, "height": size,
             "num_inference_steps": 2} for i in range(n)]


def batches(items: list[dict[str, Any]], size: int) -> list[list[dict[str, Any]]]:
    return [items[i:i + size] for i in range(0, len(items), size)]


def run_concurrently(renderer: Renderer, work: list[list[dict[str, Any]]], callers: int) -> list[dict[str, Any]]:
    """Every batch through `callers` threads at once, as Ray Data's threaded actor or Serve would call it."""
    with ThreadPoolExecutor(callers) as pool:
        return [r for done in pool.map(renderer.render_rows, work) for r in done]


def config(tiny_catalog: str, out: str, depth: int, **kw: Any) -> RendererConfig:
    return RendererConfig(catalog_path=tiny_catalog, out=out, torch_threads=1, overlap_batches=depth, **kw)


def test_outputs_are_identical_with_and_without_overlap(tiny_catalog, tmp_path):
    work = batches(rows(8, size=128), 2)
    plain = Renderer(config(tiny_catalog, str(tmp_path / "plain"), depth=1))
    serial = [r for b in work for r in plain.render_rows(b)]
    overlapped = Renderer(config(tiny_catalog, str(tmp_path / "overlap"), depth=2))
    concurrent = run_concurrently(overlapped, work, callers=2)
    assert [r["id"] for r in concurrent] == [r["id"] for r in serial]
    for a, b in zip(serial, concurrent):
        assert a["status"] == b["status"] == "ok", (a, b)
        assert a["sha256"] == b["sha256"] and (a["nsfw"], a["watermark"]) == (b["nsfw"], b["watermark"])
        with open(b["output_uri"], "rb") as f:
            assert hashlib.sha256(f.read()).hexdigest() == b["sha256"]


def test_next_render_starts_before_previous_finishing_ends(tiny_catalog, tmp_path):
    renderer = StandInRenderer(config(tiny_catalog, str(tmp_path / "out"), depth=2))
    results = run_concurrently(renderer, batches(rows(16, size=256), 4), callers=2)
    assert all(r["status"] == "ok" for r in results)
    events = list(renderer.overlap.events)
    starts = {b: t for t, b, e in events if e == "render_start"}
    ends = {b: t for t, b, e in events if e == "finish_end"}
    assert len(starts) == len(ends) == 4
    order = sorted(starts, key=starts.get)  # batches in the order their pipeline calls began
    # Each batch's pipeline call starts while the batch before it is still being finished.
    assert all(starts[later] < ends[earlier] for earlier, later in zip(order, order[1:])), events
    # And renders never run side by side: one pipeline call at a time.
    spans = sorted(intervals(events, "render"))
    assert all(a_end <= b_start for (_, a_end), (b_start, _) in zip(spans, spans[1:]))


def test_in_flight_batches_stay_within_the_bound(tiny_catalog, tmp_path):
    renderer = StandInRenderer(config(tiny_catalog, str(tmp_path / "out"), depth=2))
    work = batches(rows(24, size=128), 2)
    results = run_concurrently(renderer, work, callers=6)  # more callers than the bound: they wait, memory stays flat
    assert sorted(r["id"] for r in results) == sorted(r["id"] for b in work for r in b)
    stats = renderer.overlap.stats()
    assert stats["peak_pending"] <= 2 and renderer.overlap.pending == 0
    # At no point in the event log were more than two batches between render start and finish end.
    live = 0
    for _, _, event in sorted(renderer.overlap.events):
        live += {"render_start": 1, "finish_end": -1}.get(event, 0)
        assert live <= 2


def test_a_failed_output_write_fails_only_its_row(tiny_catalog, tmp_path):
    out = tmp_path / "out"
    work = rows(6, size=64)
    blocked = out / output_key("image", "r-3", "png")  # a non-empty folder where the file must go: every write fails
    (blocked / "x").mkdir(parents=True)
    renderer = Renderer(config(tiny_catalog, str(out), depth=2, write_deadline_s=0.3))
    results = run_concurrently(renderer, batches(work, 2), callers=2)
    by_id = {r["id"]: r for r in results}
    assert len(results) == len(by_id) == 6
    assert by_id["r-3"]["status"] == "failed" and by_id["r-3"]["error"].startswith("write_error")
    assert by_id["r-3"].get("output_uri") is None and by_id["r-3"].get("sha256") is None
    for i in (0, 1, 2, 4, 5):
        r = by_id[f"r-{i}"]
        assert r["status"] == "ok" and os.path.isfile(r["output_uri"])


def test_a_ray_data_job_with_overlap_returns_every_row_once(ray_cluster, tiny_catalog, tmp_path):
    import ray

    from cluster.batch import render

    work = rows(10, prefix="rd")
    work.append({"id": "rd-bad", "prompt": "x", "num_inference_steps": 0})
    out = str(tmp_path / "out")
    results = render(ray.data.from_items(work), tiny_catalog, out, workers=1, batch_size=2, overlap_batches=2)
    table = pa.concat_tables(ray.get(results.to_arrow_refs()))
    ids = table.column("id").to_pylist()
    assert sorted(ids) == sorted(r["id"] for r in work) and len(ids) == len(set(ids))
    for r in table.to_pylist():
        if r["id"] == "rd-bad":
            assert r["status"] == "failed"
            continue
        assert r["status"] == "ok"
        with open(absolute_uri(out, r["output_uri"]), "rb") as f:
            assert hashlib.sha256(f.read()).hexdigest() == r["sha256"]
