"""The demo: a small mixed manifest rendered on the embedded defaults."""

from __future__ import annotations

import io

import pyarrow as pa
import pyarrow.parquet as pq

from storage.fs import join, write_bytes

SUBJECTS = ["a lighthouse at dusk", "a red bicycle", "a bowl of ramen", "a snowy mountain cabin",
            "a cat in a spacesuit", "a vintage camera", "a koi pond", "a desert canyon"]
STYLES = ["watercolor", "product photo", "isometric render"]


def demo_manifest(rows: int = 24) -> pa.Table:
    """Prompts over both tiny models and every image format, some rows with explicit seeds."""
    records = []
    for i in range(rows):
        records.append(
            {
                "id": f"demo-{i:03d}",
                "model": "tiny-sdxl" if i % 4 == 3 else "tiny-sd",
                "prompt": f"{SUBJECTS[i % len(SUBJECTS)]}, {STYLES[i % len(STYLES)]}",
                "negative_prompt": "blurry" if i % 2 else None,
                "seed": i if i % 3 == 0 else None,
                "output_format": ["png", "png", "webp", "jpeg"][i % 4],
                "campaign": f"demo-{i % 3}",
            }
        )
    return pa.Table.from_pylist(
        records,
        schema=pa.schema([("id", pa.string()), ("model", pa.string()), ("prompt", pa.string()),
                          ("negative_prompt", pa.string()), ("seed", pa.int64()), ("output_format", pa.string()),
                          ("campaign", pa.string())]),
    )


def write_demo_manifest(out: str, rows: int = 24) -> str:
    uri = join(out, "manifest.parquet")
    sink = io.BytesIO()
    pq.write_table(demo_manifest(rows), sink)
    write_bytes(uri, sink.getvalue())
    return uri
