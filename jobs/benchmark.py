"""`renderfleet bench`: the CLI side of the benchmarks, which live in the source checkout's bench/ folder."""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys
from typing import Callable

from jobs.exits import UsageError


def cmd_bench(args: argparse.Namespace) -> int:
    """`renderfleet bench` (bench/run.py), `bench gpu` (bench/gpu.py), `bench cluster` (bench/cluster.py): benchmarks
    live in the checkout."""
    module = {"gpu": "bench.gpu", "cluster": "bench.cluster"}.get(args.bench_command, "bench.run")
    try:
        found = importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        found = False
    if not found:
        raise UsageError(f"{module} is not importable: run renderfleet bench from a renderfleet source checkout")
    bench = importlib.import_module(module)
    if args.bench_command in ("gpu", "cluster"):
        return bench.main(args.gpu_args)
    return bench.run(args, _bench_argv())


def add_bench_parser(sub: argparse._SubParsersAction, new_parser: Callable[..., argparse.ArgumentParser]) -> None:
    """Adds `bench` (and `bench gpu`, `bench cluster`) to the CLI's subcommands; `new_parser` is the CLI's own subparser factory."""
    text = "measure throughput, scaling, driver memory, latency and start-up side by side (JSON, Markdown, PNG plots)"
    bn = new_parser(sub, "bench", text)
    try:
        from bench.run import add_arguments
    except ImportError:  # an installed copy without the source checkout: cmd_bench says so
        add_arguments = None
    if add_arguments:
        add_arguments(bn)
    bsub = bn.add_subparsers(dest="bench_command")
    # No option prefix of its own: everything after `gpu`, --help included, goes to bench.gpu.main.
    gpu = bsub.add_parser("gpu", help="the GPU benchmark (bench/gpu.py): `renderfleet bench gpu --help` for its options",
                          prefix_chars="\0", add_help=False, formatter_class=bn.formatter_class)
    gpu.add_argument("gpu_args", nargs="*", help="passed to bench.gpu")
    cluster = bsub.add_parser("cluster", help="one job over a multi-node cluster: per-node and total images/s, actors' "
                                              "busy time, rows retried, cost per 1,000 assets (bench/cluster.py): "
                                              "`renderfleet bench cluster --help` for its options",
                              prefix_chars="\0", add_help=False, formatter_class=bn.formatter_class)
    cluster.add_argument("gpu_args", nargs="*", help="passed to bench.cluster")
    bn.set_defaults(func=cmd_bench, gpu_args=[])


def _bench_argv() -> list[str]:
    """The bench options as typed, for the command line bench.json records."""
    return sys.argv[sys.argv.index("bench") + 1:] if "bench" in sys.argv else []
