"""Section (g): what renderfleet's own steps cost per output (checker, watermark, metadata, signing) at
256² and 512², and how much of that the job hides behind a latency-bound stand-in renderer."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bench.common import Ctx, run_job, section_result, standin_catalog, start_ray, stop_ray, target, timed, write_manifest


def finishing_costs(work: Path, repeat: int) -> dict[str, float]:
    """Median ms per output of each finishing step, in this process on one torch thread."""
    import numpy as np
    import torch
    from PIL import Image

    from pipelines.catalog import SafetySettings
    from pipelines.finishing import Finisher
    from pipelines.tiny import build_tiny_models
    from tests.certs import make_test_chain  # a throwaway chain: test code, so the bench runs from the repo root

    torch.set_num_threads(1)
    root = build_tiny_models(work / "tiny", ["tiny-sd", "tiny-safety-checker"]).parent
    chain = make_test_chain(work / "keys")
    checker = str(root / "tiny-safety-checker")
    record = {"generator": "renderfleet bench", "model": "bench", "row_id": "r", "seed": "1"}
    plain = Finisher(SafetySettings(watermark=False))  # encode + metadata only: the baseline
    checked = Finisher(SafetySettings(), checker_dir=checker)
    signed = Finisher(SafetySettings(c2pa_cert_chain=chain.cert_chain_pem, c2pa_private_key=chain.private_key_pem),
                      checker_dir=checker)
    figures = {}
    for side in (256, 512):
        image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (side, side, 3), dtype=np.uint8))
        base = timed(lambda: plain.finish("image", image, None, "png", None, record), repeat)
        check = timed(lambda: checked.flags("image", [image]), repeat)
        full = timed(lambda: checked.finish("image", image, False, "png", None, record), repeat)
        sign = timed(lambda: signed.finish("image", image, False, "png", None, record), repeat)
        figures.update({f"{side}_encode_metadata_ms": base * 1000, f"{side}_checker_ms": check * 1000,
                        f"{side}_watermark_ms": (full - base) * 1000, f"{side}_signing_ms": (sign - full) * 1000,
                        f"{side}_total_unsigned_ms": (check + full) * 1000, f"{side}_total_signed_ms": (check + sign) * 1000})
    return figures


def section_g(ctx: Ctx) -> dict[str, Any]:
    costs = finishing_costs(ctx.work, ctx.pick(15, 2))
    full_ms = costs["256_total_unsigned_ms"]  # what the job does per 256² output: checker, watermark, encode, metadata
    base_ms = costs["256_encode_metadata_ms"]  # what it does with the checker and the watermark off
    sleep_ms = float(round(max(20.0, 1.5 * full_ms)))  # the stand-in's latency leaves room to hide all of it
    rows, batch = ctx.pick(96, 8), ctx.pick(8, 4)
    start_ray(standin=True)
    manifest = write_manifest(ctx.work / "g.parquet", rows, 256)
    rates = {}
    for name, on in (("finishing_on", True), ("finishing_off", False)):
        catalog = standin_catalog(ctx.work / name, sleep_ms, watermark=on, checker=on)
        rates[name] = run_job(manifest, ctx.work / f"job-{name}", catalog, workers=1, batch_size=batch).rows_per_s
    stop_ray()
    per_row_on = 1000.0 / rates["finishing_on"] if rates["finishing_on"] else 0.0
    per_row_off = 1000.0 / rates["finishing_off"] if rates["finishing_off"] else 0.0
    extra = full_ms - base_ms
    shown = per_row_on - per_row_off  # the part of the extra finishing the job's rate still pays
    hidden = min(1.0, max(0.0, 1.0 - shown / extra)) if extra > 0 else 1.0
    figures = {**costs, "hidden_fraction": hidden, "standin_ms_per_image": sleep_ms,
               "job_ms_per_row_finishing_on": per_row_on, "job_ms_per_row_finishing_off": per_row_off,
               "finishing_extra_ms": extra}
    units = {k: ("x" if k == "hidden_fraction" else "ms") for k in figures}
    notes = ["per-output costs: median of single calls in one process, one torch thread, random 256²/512² images",
             f"overlap: the job (1 worker, batch {batch}, {rows} rows at 256²) over a stand-in that sleeps {sleep_ms:g} ms "
             "per image, with the checker and the watermark on and off; hidden = 1 - (ms/row on - ms/row off) / "
             f"(their cost per output, {extra:.1f} ms), clipped to 0..1"]
    return section_result("(g) finishing cost per output, and how much of it the overlap hides", figures, units,
                          [target("hidden_fraction", hidden, ">=", 0.9, "≥ 90 % hidden")],
                          {"rows": rows, "batch": batch, "standin_ms_per_image": sleep_ms}, notes,
                          {"kind": "bar", "title": "(g) finishing ms per output", "ylabel": "ms",
                           "x": ["encode+metadata", "checker", "watermark", "signing"],
                           "series": {f"{s}²": [costs[f"{s}_encode_metadata_ms"], costs[f"{s}_checker_ms"],
                                                costs[f"{s}_watermark_ms"], costs[f"{s}_signing_ms"]] for s in (256, 512)}})
