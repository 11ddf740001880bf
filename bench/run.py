"""`renderfleet bench`: every figure of the performance issue measured side by side in one run.

Sections (a)-(h) each run in their own process (own Ray, own memory); after each one OUT/bench.json,
OUT/bench.md and OUT/bench-<section>.png are rewritten, so a killed run keeps what it measured.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench.common import BENCH_ENV, ROOT
from bench.section import SECTIONS, ints

TITLES = {"a": "orchestration efficiency", "b": "vs Ray's naive example", "c": "fan-out scaling",
          "d": "driver memory and speed", "e": "batching gain", "f": "online latency", "g": "finishing and overlap",
          "h": "start-up"}


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The bench options, shared by `renderfleet bench` and `python -m bench.run`."""
    p.add_argument("--out", default="renderfleet-bench", help="folder for bench.json, bench.md, the PNGs and logs")
    p.add_argument("--smoke", action="store_true", help="tiny sizes and counts: every section's code path in seconds "
                                                        "(what CI runs; its figures mean nothing)")
    p.add_argument("--only", type=_sections, default=list(SECTIONS), metavar="a,c,...",
                   help=f"sections to run (default: all of {','.join(SECTIONS)})")
    p.add_argument("--d-rows", type=ints, default=(), metavar="SMALL,LARGE",
                   help="(d) manifest sizes (default 10000,60000; 200,400 with --smoke)")
    p.add_argument("--workers", type=ints, default=(), metavar="N,N,...",
                   help="(c) worker counts (default 1,2,4,8; 1,2 with --smoke)")
    p.add_argument("--section-timeout", type=float, default=None, metavar="S",
                   help="seconds a section may take before it is stopped and recorded as failed "
                        "(default 600, 180 with --smoke)")
    p.add_argument("--keep", action="store_true", help="keep each section's scratch folder under OUT/work")


def _sections(text: str) -> list[str]:
    picked = [s.strip().strip("()").lower() for s in text.split(",") if s.strip()]
    unknown = [s for s in picked if s not in SECTIONS]
    if unknown or not picked:
        raise argparse.ArgumentTypeError(f"unknown section(s) {', '.join(unknown) or '(none)'}; pick from {','.join(SECTIONS)}")
    return [s for s in SECTIONS if s in picked]


def machine() -> dict[str, Any]:
    """Where the figures came from, including how busy the machine was."""
    from importlib.metadata import PackageNotFoundError, version

    import psutil

    def v(name: str) -> str:
        try:
            return version(name)
        except PackageNotFoundError:
            return "-"

    accelerator = "no GPU"
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=10)
        if out.returncode == 0 and out.stdout.strip():
            accelerator = ", ".join(out.stdout.split("\n")).strip(", ")
    except (OSError, subprocess.SubprocessError):
        pass
    return {"cpus": os.cpu_count(), "memory_gb": psutil.virtual_memory().total / 2**30, "accelerator": accelerator,
            "platform": platform.platform(), "python": platform.python_version(), "torch": v("torch"), "ray": v("ray"),
            "diffusers": v("diffusers"), "load_start": os.getloadavg()[0], "load_now": os.getloadavg()[0]}


def run_section(name: str, args: argparse.Namespace, out: Path) -> dict[str, Any]:
    """One section in its own process group, stopped (the whole group, Ray's daemons too) past its timeout."""
    result = out / "sections" / f"{name}.json"
    result.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "bench.section", name, "--result", str(result), "--work", str(out / "work" / name)]
    cmd += ["--smoke"] * args.smoke + ["--keep"] * args.keep
    if args.d_rows:
        cmd += ["--d-rows", ",".join(map(str, args.d_rows))]
    if args.workers:
        cmd += ["--workers", ",".join(map(str, args.workers))]
    env = {**os.environ, **BENCH_ENV, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    timeout = args.section_timeout or (180.0 if args.smoke else 600.0)
    started = time.perf_counter()
    with open(out / "logs" / f"{name}.log", "w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pass
        finally:
            stop_group(proc)
    if result.exists():
        return json.loads(result.read_text())
    why = f"timed out after {timeout:.0f} s" if time.perf_counter() - started >= timeout else f"exited {proc.returncode}"
    return {"title": f"({name}) {TITLES[name]}", "error": f"{why}; see {out / 'logs' / f'{name}.log'}", "figures": {},
            "targets": [], "elapsed_s": time.perf_counter() - started}


def stop_group(proc: subprocess.Popen) -> None:
    """Ends the section's process group: Ray's gcs_server and raylet ignore SIGTERM, so SIGKILL after a grace."""
    for sig, grace in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            continue
    if proc.poll() is None:
        proc.wait()


def summary(name: str, s: dict[str, Any]) -> str:
    if s.get("error"):
        return f"[bench] ({name}) failed after {s.get('elapsed_s', 0):.0f} s: {s['error'][:300]}"
    marks = [f"{t['figure']} {t['value']:.3g} ({t['text']}: {'pass' if t['pass'] else 'miss'})" for t in s["targets"]]
    return f"[bench] ({name}) done in {s.get('elapsed_s', 0):.0f} s" + (": " + "; ".join(marks) if marks else "")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    p = argparse.ArgumentParser(prog="renderfleet bench", description=__doc__)
    add_arguments(p)
    return run(p.parse_args(argv), argv)


def run(args: argparse.Namespace, argv: list[str]) -> int:
    """Runs the chosen sections in order; 0 when every one finished (targets missed or not), else 1."""
    from bench.report import write_all

    out = Path(args.out).resolve()
    for sub in ("sections", "logs", "work"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    data: dict[str, Any] = {"command": shlex.join(["renderfleet", "bench", *argv]), "smoke": args.smoke,
                            "machine": machine(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "sections": {}}
    print(f"[bench] sections {','.join(args.only)}{' (smoke)' if args.smoke else ''}; results in {out}", flush=True)
    began = time.perf_counter()
    for name in args.only:
        print(f"[bench] ({name}) {TITLES[name]} ...", flush=True)
        data["sections"][name] = run_section(name, args, out)
        data["machine"]["load_now"] = os.getloadavg()[0]
        data["total_s"] = time.perf_counter() - began
        write_all(out, data)
        print(summary(name, data["sections"][name]), flush=True)
    if not args.keep:
        import shutil

        shutil.rmtree(out / "work", ignore_errors=True)
    print(f"[bench] {time.perf_counter() - began:.0f} s; {out / 'bench.md'}", flush=True)
    return 1 if any(s.get("error") for s in data["sections"].values()) else 0


if __name__ == "__main__":
    sys.exit(main())
