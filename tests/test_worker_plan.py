"""Sizing an elastic actor pool and its custom resources: `--workers MIN..MAX`, `--worker-resources NAME=AMOUNT`,
from the command line through RenderJob and WorkerPlan to Ray Data's ActorPoolStrategy (no cluster needed)."""

from __future__ import annotations

import pytest

from cluster.overlap import render_pool
from cluster.resources import plan_workers
from jobs.scaling_args import Workers, parse_resources, parse_workers

pytestmark = pytest.mark.timeout(60)


def test_workers_parse_as_n_or_a_range():
    assert parse_workers("4") == Workers(4) and str(Workers(4)) == "4"
    assert parse_workers("1..3") == Workers(1, 3) and str(Workers(1, 3)) == "1..3"
    for bad in ("0", "3..1", "a..b", "1..", "..3", "-1..2"):
        with pytest.raises(ValueError):
            parse_workers(bad)


def test_worker_resources_parse_and_refuse_what_the_plan_sizes():
    assert parse_resources(["accel=1", "fast_disk=0.5"]) == {"accel": 1.0, "fast_disk": 0.5}
    for bad in ("accel", "accel=0", "accel=x", "=1", "CPU=1", "GPU=1", "memory=10"):
        with pytest.raises(ValueError):
            parse_resources([bad])


def test_an_elastic_plan_sizes_cpus_for_its_largest_pool():
    nodes = [{"CPU": 2.0}, {"CPU": 2.0}]
    fixed = plan_workers(nodes, 2)
    assert (fixed.workers, fixed.max_workers, fixed.label, fixed.elastic) == (2, None, "2", False)
    elastic = plan_workers(nodes, 1, max_workers=4)
    assert (elastic.workers, elastic.max_workers, elastic.label, elastic.elastic) == (1, 4, "1..4", True)
    assert elastic.num_cpus == 0.875  # two actors per 2-CPU node at the max, TASK_CPUS to spare
    assert plan_workers(nodes, 3, max_workers=3).max_workers is None  # MIN == MAX is a fixed pool


def test_custom_resources_count_slots_and_plan_for_nodes_yet_to_come():
    plan = plan_workers([{"CPU": 4.0}, {"CPU": 4.0, "accel": 2.0}], None, resources={"accel": 1})
    assert plan.workers == 2 and plan.resources == {"accel": 1.0} and plan.num_gpus == 0.0
    assert plan.num_cpus == 1.0  # the accel node holds 2 actors: (4 - 0.25) / 2, capped at one CPU
    # The autoscaler has not launched a node with the resource yet: one actor on a node like the smallest here.
    pending = plan_workers([{"CPU": 1.0}], 1, max_workers=3, resources={"accel": 1})
    assert (pending.workers, pending.max_workers, pending.num_cpus) == (1, 3, 0.75)


def test_render_pool_is_elastic_only_when_max_exceeds_min():
    fixed, elastic = render_pool(2, 2), render_pool(1, 2, 4)
    assert (fixed.min_size, fixed.max_size) == (2, 2)
    assert (elastic.min_size, elastic.max_size) == (1, 4)
    assert elastic.max_concurrent_calls_per_actor == 2  # the overlap depth is kept
    assert (render_pool(3, 1, 3).min_size, render_pool(3, 1, 3).max_size) == (3, 3)


def test_the_cli_carries_the_range_and_resources_to_the_job_and_to_submit():
    from jobs.cli import _job, _render_args, parser
    from jobs.submit import render_argv

    args = parser().parse_args(["render", "m.parquet", "--out", "out", "--workers", "1..3",
                                "--worker-resources", "accel=1"])
    job = _job(args, args.manifest, args.out)
    assert (job.workers, job.max_workers, job.worker_resources) == (1, 3, {"accel": 1.0})
    assert render_argv(args, _render_args)[-4:] == ["--workers", "1..3", "--worker-resources", "accel=1"]
    plain = parser().parse_args(["render", "m.parquet", "--out", "out", "--workers", "2"])
    job = _job(plain, plain.manifest, plain.out)
    assert (job.workers, job.max_workers, job.worker_resources) == (2, None, {})
    with pytest.raises(SystemExit):
        parser().parse_args(["render", "m.parquet", "--out", "out", "--worker-resources", "CPU=2"])


def test_actors_always_leave_a_task_its_share_of_every_node():
    """Rounding must never eat the read tasks' share: 4 actors of 0.438 CPU on 2 CPUs left 0.248 of the 0.25
    a task asks for, and the job hung (found by the bench's fan-out section)."""
    from cluster.resources import TASK_CPUS

    for cpus in (1, 2, 3, 4, 6, 8, 16):
        for workers in range(1, 4 * cpus + 1):
            plan = plan_workers([{"CPU": float(cpus)}], workers)
            # Ray counts resources in units of 1/10000.
            assert round(plan.num_cpus * 10**4) * workers + round(TASK_CPUS * 10**4) <= cpus * 10**4 or \
                plan.num_cpus == 0.05, (cpus, workers, plan.num_cpus)
