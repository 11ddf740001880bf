"""Runs one benchmark section in this process and writes its result JSON: `python -m bench.section NAME ...`.

bench/run.py starts one of these per section, so each has its own Ray (or none) and its own memory.
"""

from __future__ import annotations

import argparse
import importlib
import json
import shutil
import sys
import time
import traceback
from pathlib import Path

from bench.common import Ctx, apply_env

# Section letter -> (module, function).
SECTIONS: dict[str, tuple[str, str]] = {
    "a": ("bench.efficiency", "section_a"),
    "b": ("bench.efficiency", "section_b"),
    "c": ("bench.scaling", "section_c"),
    "d": ("bench.scaling", "section_d"),
    "e": ("bench.efficiency", "section_e"),
    "f": ("bench.online", "section_f"),
    "g": ("bench.finishing", "section_g"),
    "h": ("bench.startup", "section_h"),
}


def ints(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(",") if x.strip())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("name", choices=sorted(SECTIONS))
    p.add_argument("--result", required=True, help="where this section's JSON goes")
    p.add_argument("--work", required=True, help="scratch folder (removed afterwards unless --keep)")
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--keep", action="store_true")
    p.add_argument("--d-rows", type=ints, default=())
    p.add_argument("--workers", type=ints, default=())
    args = p.parse_args(argv)
    apply_env()
    module, function = SECTIONS[args.name]
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    ctx = Ctx(work=work, smoke=args.smoke, d_rows=args.d_rows, scale_workers=args.workers)
    started = time.perf_counter()
    try:
        result = getattr(importlib.import_module(module), function)(ctx)
        result["elapsed_s"] = time.perf_counter() - started
        status = 0
    except Exception as e:  # noqa: BLE001 - a failed section is recorded as such; the others still run
        traceback.print_exc()
        result = {"title": f"({args.name}) failed", "error": f"{type(e).__name__}: {e}", "figures": {}, "targets": [],
                  "elapsed_s": time.perf_counter() - started}
        status = 1
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    Path(args.result).write_text(json.dumps(result, indent=1, default=str))
    return status


if __name__ == "__main__":
    sys.exit(main())
