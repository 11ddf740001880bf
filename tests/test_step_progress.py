"""Issue 14: denoising steps as they happen, on real tiny pipelines (both diffusers callback styles), through the
store writer a model replica uses, and folded into a job's progress the way its runner does."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest

from cluster.job_store import JobStore, StepFold
from cluster.step_progress import ProgressWriter, progress_uris
from helpers import load_pipeline
from pipelines.progress import step_hooks
from pipelines.tasks import Request, call_parameters, render_group
from pipelines.tiny import build_tiny_models
from pipelines.tiny.registry import TINY_MODELS

pytestmark = [pytest.mark.timeout(60), pytest.mark.usefixtures("one_torch_thread")]

STEPS = 4
# name -> the callback style its pipeline takes
STYLES = {"tiny-sd": "callback_on_step_end", "tiny-t2v": "callback", "tiny-audioldm": "callback"}


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("tiny-steps")
    build_tiny_models(root, [*STYLES, "tiny-if", "tiny-t2v-zero"])
    return root


def _stage(root: Path, name: str, **call: Any) -> tuple[Any, dict[str, Any]]:
    entry = TINY_MODELS[name].entry
    defaults = {k: v for k, v in entry.get("defaults", {}).items() if k != "fps"}  # fps is for encoding
    return load_pipeline(root / name, entry.get("pipeline_class")), {**defaults, **call}


def _task(name: str) -> str:
    return TINY_MODELS[name].entry["tasks"][0]


@pytest.mark.parametrize("name", sorted(STYLES))
def test_the_step_callback_fires_once_per_denoising_step(tiny_root, name):
    pipe, shared = _stage(tiny_root, name, num_inference_steps=STEPS)
    assert STYLES[name] in call_parameters(pipe)
    seen: list[tuple[int, int]] = []
    outputs = render_group(_task(name), [(pipe, shared)], [Request(seed=1, prompt="a cat"), Request(seed=2, prompt="a dog")],
                           lambda done, total: seen.append((done, total)))
    assert len(outputs) == 2
    assert seen == [(k, STEPS) for k in range(1, STEPS + 1)], seen


def test_a_cascade_reports_every_stage_against_their_summed_steps(tiny_root):
    stages = [_stage(tiny_root, "tiny-if", num_inference_steps=3), _stage(tiny_root, "tiny-if-2", num_inference_steps=2)]
    seen: list[tuple[int, int]] = []
    render_group("image", stages, [Request(seed=1, prompt="a cat")], lambda done, total: seen.append((done, total)))
    assert seen == [(k, 5) for k in range(1, 6)], seen


def test_a_family_that_renders_one_request_per_call_reports_one_rising_count(tiny_root):
    pipe, shared = _stage(tiny_root, "tiny-t2v-zero")
    seen: list[tuple[int, int]] = []
    render_group("video", [(pipe, shared)], [Request(seed=1, prompt="a cat"), Request(seed=2, prompt="a dog")],
                 lambda done, total: seen.append((done, total)))
    fractions = [d / t for d, t in seen]
    assert [d for d, _ in seen] == list(range(1, len(seen) + 1)) and fractions == sorted(fractions), seen
    assert seen[-1][0] == seen[-1][1] and len(seen) >= 2 * shared["num_inference_steps"], seen


def test_no_report_means_no_callback_and_a_failing_report_never_fails_the_render(tiny_root, monkeypatch):
    import pipelines.tasks as tasks

    pipe, shared = _stage(tiny_root, "tiny-sd", num_inference_steps=STEPS)
    passed: list[set[str]] = []
    real = tasks.call_arguments
    monkeypatch.setattr(tasks, "call_arguments", lambda *a, **k: (lambda kw: passed.append(set(kw)) or kw)(real(*a, **k)))
    render_group("image", [(pipe, shared)], [Request(seed=1, prompt="a cat")])  # a batch render: no report asked
    assert "callback_on_step_end" not in passed[-1] and "callback" not in passed[-1]

    calls = []

    def broken(done: int, total: int) -> None:
        calls.append(done)
        raise OSError("the store is down")

    [image] = render_group("image", [(pipe, shared)], [Request(seed=1, prompt="a cat")], broken)
    assert image.size == (64, 64) and calls == [1]  # reported once, then quiet; the render went on
    assert step_hooks(object(), frozenset({"prompt", "num_inference_steps"}), lambda total: None) == {}  # e.g. Shap-E


def test_the_writer_throttles_keeps_the_latest_count_and_deletes_when_the_call_ends(tmp_path):
    store = JobStore(str(tmp_path))
    uri = store.progress_uri("video_" + "a" * 32, "row-0")
    writer = ProgressWriter(interval_s=0.3)
    assert progress_uris(str(tmp_path), [{"id": "x"}, {"id": "y", "progress_uri": str(tmp_path / "elsewhere.json")}]) == []
    [checked] = progress_uris(str(tmp_path), [{"id": "row-0", "progress_uri": uri}])
    with writer.reporting([checked]) as report:
        for k in range(1, 101):  # 100 steps in ~0.5 s: a handful of writes, not 100
            report(k, 100)
            time.sleep(0.005)
        time.sleep(0.4)  # past the interval: the last count is written
        assert json.loads(Path(uri).read_text()) == {"steps_done": 100, "steps_total": 100}
        assert store.read_progress("video_" + "a" * 32, ["row-0", "row-1"]) == {"row-0": 1.0}
    assert 2 <= writer.writes <= 5, writer.writes
    deadline = time.monotonic() + 5
    while Path(uri).exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not Path(uri).exists()  # the call ended: its progress key is gone

    blocked = tmp_path / "a-file"
    blocked.write_text("not a folder")
    bad = ProgressWriter(interval_s=0.0)
    with bad.reporting([str(blocked / "jobs" / "x.json")]) as report:
        report(1, 2)  # cannot be written: counted, logged, never raised
        deadline = time.monotonic() + 5
        while bad.failures == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
    assert bad.failures >= 1


def test_a_jobs_progress_never_goes_back_and_never_reaches_100_before_completion():
    one = StepFold(rows=1)
    assert one.fold(0, {}) == 0  # queued on the replica: no key yet
    assert one.fold(0, {"r0": 0.25}) == 25
    assert one.fold(25, {"r0": 0.1}) == 25  # a row re-rendered from the start: no step back
    assert one.fold(25, {"r0": 1.0}) == 99  # every step done, the output still being finished and stored
    two = StepFold(rows=2)
    assert two.fold(0, {"r0": 0.5}) == 25
    assert two.fold(25, {"r1": 0.5}) == 75  # r0's key went: its call ended, all its steps are done
    assert two.fold(75, {}) == 99
    assert two.fold(99, {}) == 99
