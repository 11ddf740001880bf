"""`renderfleet bench gpu`: one short, one-shot accelerator check of real-size SD 1.5 and SDXL architectures.

Sections (each writes OUT/gpu-<section>.json as it finishes; every run is appended to OUT/gpu.jsonl at once):

* throughput: per-step time and images/s at 512² and 1024², 20 steps, batch 1 and 4, bare diffusers vs
  renderfleet's Renderer (row checks, watermark, PNG encoding and writes included);
* offload: peak device memory and 2-step time of each offload policy (none, model, group, group leaf, sequential);
* compile: torch.compile of the SD 1.5 UNet (regional, then full), compile time reported apart.

Per-step time is (t(20 steps) - t(2 steps)) / 18, so fixed costs (text encoding, decoding, writing) cancel.
Everything stops at the overall guard (5 minutes): the table then shows what finished. `--smoke` shrinks the
models, sizes and steps so the same code runs on a CPU in seconds (what the test suite does).
Needs torch plus diffusers, transformers, tokenizers, safetensors, huggingface_hub, pyyaml (as wheels on a
machine without network); the Renderer rows also need the renderer's own imports (pyarrow, numpy, PIL,
opencv, ...): without them those rows say why and the rest still runs.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
import statistics
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

import torch

from bench.gpu_models import ARCHS, build, parameters
from pipelines.catalog import Policy
from pipelines.placement import compile_seconds, place

SECTIONS = ("throughput", "offload", "compile")
OFFLOAD_POLICIES = (("none", Policy()), ("model", Policy(offload="model")), ("group", Policy(offload="group")),
                    ("group-leaf", Policy(offload="group", group_blocks=0)), ("sequential", Policy(offload="sequential")))
PROMPT = "a photograph of an astronaut riding a horse"


@dataclass(frozen=True)
class Plan:
    """Sizes, steps and batches of one run; `smoke` shrinks them."""

    sizes: tuple[int, ...] = (512, 1024)
    batches: tuple[int, ...] = (1, 4)
    steps: int = 20
    short_steps: int = 2
    offload_arch: str = "sdxl"
    offload_size: int = 1024
    compile_size: int = 512
    compile_backend: str = "inductor"
    archs: tuple[str, ...] = ARCHS
    repeats: int = 1  # timed calls per variant; the median counts

    @classmethod
    def smoke(cls) -> Plan:
        return cls(sizes=(64,), batches=(1, 2), steps=3, short_steps=1, offload_size=64, compile_size=64,
                   compile_backend="eager")


class Recorder:
    """Appends each result as it comes, writes each section when it ends, and prints one table."""

    def __init__(self, out: Path, guard_s: float):
        self.out = out
        self.out.mkdir(parents=True, exist_ok=True)
        self.deadline = time.monotonic() + guard_s
        self.rows: list[dict[str, Any]] = []
        self.lock = threading.Lock()

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def add(self, row: dict[str, Any]) -> None:
        with self.lock:
            self.rows.append(row)
            with open(self.out / "gpu.jsonl", "a") as f:
                f.write(json.dumps(row) + "\n")
        print(_line(row), flush=True)

    def section_done(self, section: str) -> None:
        with self.lock:
            rows = [r for r in self.rows if r["section"] == section]
            (self.out / f"gpu-{section}.json").write_text(json.dumps(rows, indent=1))

    def table(self) -> str:
        with self.lock:
            return "\n".join([HEADER] + [_line(r) for r in self.rows])


HEADER = (f"{'section':<10} {'arch':<5} {'variant':<18} {'size':>5} {'batch':>5} {'step ms':>8} {'img/s':>7} "
          f"{'total s':>8} {'peak GiB':>8} {'compile s':>9}  note")


def _line(r: dict[str, Any]) -> str:
    def f(key: str, fmt: str) -> str:
        return format(r[key], fmt) if isinstance(r.get(key), (int, float)) else "-"
    return (f"{r['section']:<10} {r.get('arch', ''):<5} {r.get('variant', ''):<18} {f('size', 'd'):>5} {f('batch', 'd'):>5} "
            f"{f('step_ms', '.1f'):>8} {f('images_per_s', '.2f'):>7} {f('total_s', '.2f'):>8} {f('peak_gib', '.2f'):>8} "
            f"{f('compile_s', '.1f'):>9}  {r.get('note', '')}")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(device: torch.device, call: Callable[[], Any]) -> float:
    _sync(device)
    started = time.perf_counter()
    call()
    _sync(device)
    return time.perf_counter() - started


def _bare(pipe: Any, size: int, batch: int, device: torch.device) -> Callable[[int], Any]:
    """A plain diffusers call: `batch` prompts, PIL out, nothing written."""
    def call(steps: int) -> Any:
        generators = [torch.Generator(device).manual_seed(i) for i in range(batch)]
        return pipe(prompt=[PROMPT] * batch, num_inference_steps=steps, width=size, height=size, generator=generators)
    return call


class RendererRuns:
    """renderfleet's Renderer over an in-process pipeline (adopted into its pool; no disk load, no Ray)."""

    def __init__(self, work: Path, dtype: str):
        from cluster.renderer import Renderer, RendererConfig  # imports without Ray
        from storage.params import Limits

        work.mkdir(parents=True, exist_ok=True)
        catalog = work / "catalog.yaml"
        models = {arch: {"source": f"bench/{arch}", "dtype": dtype} for arch in ARCHS}
        catalog.write_text(json.dumps({"models": models}))  # JSON is YAML
        self.renderer = Renderer(RendererConfig(catalog_path=str(catalog), out=str(work / "renders"),
                                                limits=Limits(max_pixels=4096 * 4096), torch_threads=torch.get_num_threads()))
        self.count = 0

    def adopt(self, arch: str, pipe: Any) -> None:
        self.renderer.pool.adopt(self.renderer.catalog.pipeline(arch), pipe)

    def call(self, arch: str, size: int, batch: int) -> Callable[[int], Any]:
        def run(steps: int) -> float:
            self.count += 1
            rows = [{"id": f"{arch}-{size}-{batch}-{self.count}-{i}", "prompt": PROMPT, "model": arch, "width": size,
                     "height": size, "num_inference_steps": steps, "seed": i} for i in range(batch)]
            results = self.renderer.render_rows(rows)
            bad = [r for r in results if r["status"] != "ok"]
            if bad:
                raise RuntimeError(f"renderer rows not ok: {bad[0].get('error') or bad[0].get('filter_reason')}")
            from cluster.overlap import intervals
            start, end = intervals(list(self.renderer.overlap.events), "render")[-1]
            return end - start  # checks and the pipeline call; the rest of the call is finishing
        return run


def measure(rec: Recorder, plan: Plan, device: torch.device, row: dict[str, Any], call: Callable[[int], Any]
            ) -> dict[str, Any]:
    """Warm-up, then the short and the full call; per-step time from their difference. Returns the row to add."""
    if rec.left() < 5:
        return {**row, "note": "skipped: guard"}
    try:
        call(plan.short_steps)  # warm-up (cuDNN autotuning, allocator)
        shorts, fulls, pipes = [], [], []
        for _ in range(plan.repeats):
            shorts.append(_timed(device, lambda: call(plan.short_steps)))
            fulls.append(_timed(device, lambda: pipes.append(call(plan.steps))))
    except Exception as e:  # noqa: BLE001 - one failed variant must not stop the check
        return {**row, "note": f"failed: {type(e).__name__}: {str(e)[:160]}"}
    short, full = statistics.median(shorts), statistics.median(fulls)
    step = (full - short) / (plan.steps - plan.short_steps)
    out = {**row, "step_ms": step * 1e3, "images_per_s": row["batch"] / full, "total_s": full, "peak_gib": _peak(device)}
    if plan.repeats > 1:
        out["full_s_each"] = [round(t, 4) for t in fulls]
    if all(isinstance(p, float) for p in pipes):  # the renderer: its pipeline call apart from finishing
        out["pipe_s"] = statistics.median(pipes)
        out["note"] = f"pipeline call {out['pipe_s']:.2f} s, finishing {full - out['pipe_s']:.2f} s"
    return out


def _peak(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def throughput(rec: Recorder, plan: Plan, device: torch.device, dtype: torch.dtype, smoke: bool, work: Path) -> None:
    try:
        renderer: RendererRuns | None = RendererRuns(work, str(dtype).removeprefix("torch."))
        renderer_note = ""
    except Exception as e:  # noqa: BLE001 - e.g. a renderer dependency missing on the device machine
        renderer, renderer_note = None, f"renderer unavailable: {type(e).__name__}: {str(e)[:120]}"
    for arch in plan.archs:
        if rec.left() < 10:
            break
        pipe = build(arch, device, dtype, smoke)
        rec.add({"section": "throughput", "arch": arch, "variant": "parameters", "note": json.dumps(parameters(pipe))})
        if renderer is not None:
            renderer.adopt(arch, pipe)
        for size in plan.sizes:
            for batch in plan.batches:
                base = {"section": "throughput", "arch": arch, "size": size, "batch": batch}
                rec.add(measure(rec, plan, device, {**base, "variant": "diffusers"}, _bare(pipe, size, batch, device)))
                if renderer is None:
                    rec.add({**base, "variant": "renderer", "note": renderer_note})
                else:
                    rec.add(measure(rec, plan, device, {**base, "variant": "renderer"}, renderer.call(arch, size, batch)))
        if renderer is not None:
            renderer.renderer.pool.clear()
        del pipe
        _free(device)


def offload(rec: Recorder, plan: Plan, device: torch.device, dtype: torch.dtype, smoke: bool, work: Path) -> None:
    """Peak memory of each offload policy over a 2-step call (weights start on the host)."""
    arch, size = plan.offload_arch, plan.offload_size
    for name, policy in OFFLOAD_POLICIES:
        if rec.left() < 20:
            rec.add({"section": "offload", "arch": arch, "variant": name, "note": "skipped: guard"})
            continue
        try:
            pipe = build(arch, device, dtype, smoke).to("cpu")
            _free(device)
            started = time.perf_counter()
            placed = place(pipe, policy, device, warm=False)
            _timed(device, lambda: _bare(pipe, size, 1, device)(2))
            rec.add({"section": "offload", "arch": arch, "variant": name, "size": size, "batch": 1,
                     "total_s": time.perf_counter() - started, "peak_gib": _peak(device),
                     "note": f"offload={placed.offload}"})
        except Exception as e:  # noqa: BLE001
            rec.add({"section": "offload", "arch": arch, "variant": name, "note": f"failed: {type(e).__name__}: {str(e)[:160]}"})
        pipe = None
        _free(device)


def compiled(rec: Recorder, plan: Plan, device: torch.device, dtype: torch.dtype, smoke: bool, work: Path) -> None:
    """SD 1.5 with its UNet compiled (regional, then whole): compile seconds apart from the per-step time."""
    for mode in ("regional", "full"):
        if rec.left() < 60 and not smoke:
            rec.add({"section": "compile", "arch": "sd15", "variant": mode, "note": "skipped: guard"})
            continue
        pipe = build("sd15", device, dtype, smoke)
        torch._dynamo.reset()
        before = compile_seconds()
        placed = place(pipe, Policy(compile=mode, compile_backend=plan.compile_backend), device, warm=False)
        for batch in plan.batches:
            call = _bare(pipe, plan.compile_size, batch, device)
            row = {"section": "compile", "arch": "sd15", "variant": f"{placed.compiled}/{plan.compile_backend}",
                   "size": plan.compile_size, "batch": batch}
            result = measure(rec, plan, device, row, call)
            rec.add({**result, "compile_s": compile_seconds() - before})  # this batch size's (re)compile
            before = compile_seconds()
        del pipe
        _free(device)


RUNNERS = {"throughput": throughput, "offload": offload, "compile": compiled}


def main(argv: list[str] | None = None) -> int:
    """Runs the sections, prints the table; 0 when every section ran, 3 when the guard cut it short."""
    p = argparse.ArgumentParser(prog="renderfleet bench gpu", description=__doc__.split("\n")[0])
    p.add_argument("--out", default=None, help="results folder (default: a new temporary folder)")
    p.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {','.join(SECTIONS)}")
    p.add_argument("--guard-seconds", type=float, default=300.0, help="overall time limit; what finished is kept")
    p.add_argument("--device", default="auto", help="cuda, cpu or auto")
    p.add_argument("--smoke", action="store_true", help="tiny widths, sizes and steps: the code path on CPU in seconds")
    p.add_argument("--archs", default=None, help=f"throughput: comma-separated subset of {','.join(ARCHS)}")
    p.add_argument("--sizes", default=None, help="throughput: comma-separated sizes (default 512,1024)")
    p.add_argument("--batches", default=None, help="throughput and compile: comma-separated batch sizes (default 1,4)")
    p.add_argument("--repeats", type=int, default=1, help="timed calls per variant (the median counts)")
    args = p.parse_args(argv)
    sections = [s for s in args.sections.split(",") if s]
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        p.error(f"unknown sections: {', '.join(sorted(unknown))}")
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    plan = Plan.smoke() if args.smoke else Plan()
    try:
        plan = replace(plan, repeats=max(1, args.repeats), **_filters(args))
    except ValueError as e:
        p.error(str(e))
    if args.smoke and device.type == "cpu":
        torch.set_num_threads(1)  # tiny models: 1 thread is fastest, and 2 stall when the other core is busy
    out = Path(args.out or tempfile.mkdtemp(prefix="rf-bench-gpu-"))
    rec = Recorder(out, args.guard_seconds)
    print(f"[bench gpu] device={device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}) "
          f"dtype={dtype} torch={torch.__version__} out={out}", flush=True)
    guard = threading.Timer(args.guard_seconds, _expired, args=(rec,))
    guard.daemon = True
    guard.start()
    print(HEADER, flush=True)
    for section in sections:
        RUNNERS[section](rec, plan, device, dtype, args.smoke, out / "work")
        rec.section_done(section)
    guard.cancel()
    # Sections leave variants out once under 5 s are left: then the guard cut the run short too.
    cut = rec.left() < 5 or any(r.get("note") == "skipped: guard" for r in rec.rows)
    print("\n" + rec.table() + ("\n[guard expired]" if cut else ""), flush=True)
    (out / "gpu-table.txt").write_text(rec.table() + ("\n[guard expired]\n" if cut else "\n"))
    return 3 if cut else 0


def _filters(args: argparse.Namespace) -> dict[str, Any]:
    """The plan's fields the command line narrows; unknown architectures and non-numbers are refused."""
    picked: dict[str, Any] = {}
    if args.archs:
        archs = tuple(a for a in args.archs.split(",") if a)
        if set(archs) - set(ARCHS):
            raise ValueError(f"unknown archs: {', '.join(sorted(set(archs) - set(ARCHS)))} (known: {', '.join(ARCHS)})")
        picked["archs"] = archs
    for name in ("sizes", "batches"):
        value = getattr(args, name)
        if value:
            try:
                picked[name] = tuple(int(v) for v in value.split(",") if v)
            except ValueError:
                raise ValueError(f"--{name} takes comma-separated integers, got {value!r}") from None
    return picked


def _expired(rec: Recorder) -> None:
    """The overall guard: write what finished and stop the process at once (a stuck kernel never returns)."""
    table = rec.table()
    (rec.out / "gpu-table.txt").write_text(table + "\n[guard expired]\n")
    for section in SECTIONS:
        rec.section_done(section)
    print("\n[bench gpu] guard expired; results so far:\n" + table, flush=True)
    os._exit(3)


if __name__ == "__main__":
    sys.exit(main())
