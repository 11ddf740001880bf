"""Per-output cost of renderfleet's own steps (checker, watermark, metadata, signing), measured in one run."""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image


def timed(fn, repeat: int = 15) -> float:
    fn()
    runs = []
    for _ in range(repeat):
        started = time.perf_counter()
        fn()
        runs.append(time.perf_counter() - started)
    return statistics.median(runs)


def main() -> None:
    import torch

    from pipelines.catalog import SafetySettings
    from pipelines.finishing import Finisher
    from pipelines.tiny import build_tiny_models
    from tests.certs import make_test_chain  # a throwaway chain: test code, so bench runs from the repo root

    torch.set_num_threads(1)
    work = Path(tempfile.mkdtemp(prefix="rf-finish-bench-"))
    root = build_tiny_models(work / "tiny", ["tiny-sd", "tiny-safety-checker"]).parent
    chain = make_test_chain(work / "keys")
    record = {"generator": "renderfleet bench", "model": "bench", "row_id": "r", "seed": "1"}
    plain = Finisher(SafetySettings(watermark=False))  # encode + metadata only: the baseline
    checked = Finisher(SafetySettings(), checker_dir=str(root / "tiny-safety-checker"))
    signed = Finisher(SafetySettings(c2pa_cert_chain=chain.cert_chain_pem, c2pa_private_key=chain.private_key_pem),
                      checker_dir=str(root / "tiny-safety-checker"))
    for side in (256, 512):
        image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (side, side, 3), dtype=np.uint8))
        base = timed(lambda: plain.finish("image", image, None, "png", None, record))
        check = timed(lambda: checked.flags("image", [image]))
        full = timed(lambda: checked.finish("image", image, False, "png", None, record))
        sign = timed(lambda: signed.finish("image", image, False, "png", None, record))
        print(f"{side}x{side} PNG: encode + metadata {base * 1000:.1f} ms; checker {check * 1000:.1f} ms; "
              f"watermark + encode + metadata {full * 1000:.1f} ms (+{(full - base) * 1000:.1f} ms); "
              f"with C2PA signing {sign * 1000:.1f} ms; total overhead per image "
              f"{(check + full - base) * 1000:.1f} ms unsigned, {(check + sign - base) * 1000:.1f} ms signed")


if __name__ == "__main__":
    main()
