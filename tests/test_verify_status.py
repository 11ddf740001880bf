"""`renderfleet verify` statuses: a file too small for a watermark is its own case, not a failure."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from jobs.cli import main
from jobs.verify import UNMARKED_SMALL, verify
from pipelines.media.watermark import WatermarkConfig

pytestmark = pytest.mark.timeout(120)


def _noise(path, side: int) -> str:
    rng = np.random.default_rng(side)
    Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)).save(path)
    return str(path)


def test_small_image_is_unmarked_small_and_exits_0(tmp_path, capsys):
    small = _noise(tmp_path / "small.png", 64)
    v = verify(small, WatermarkConfig())
    assert v.ok and v.status == UNMARKED_SMALL and v.accuracy is None
    assert main(["verify", small]) == 0
    assert f"PASS [{UNMARKED_SMALL}]" in capsys.readouterr().out


def test_large_unmarked_image_still_fails(tmp_path, capsys):
    large = _noise(tmp_path / "large.png", 256)
    v = verify(large, WatermarkConfig())
    assert not v.ok and v.status == "no_watermark" and v.accuracy < 0.9
    assert main(["verify", large, _noise(tmp_path / "small.png", 64)]) == 1
    text = capsys.readouterr().out
    assert "FAIL [no_watermark]" in text and f"PASS [{UNMARKED_SMALL}]" in text
