"""The demo: a small manifest over every task, rendered on the embedded defaults."""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from storage.fs import join, write_bytes

SUBJECTS = ["a lighthouse at dusk", "a red bicycle", "a bowl of ramen", "a snowy mountain cabin",
            "a cat in a spacesuit", "a vintage camera", "a koi pond", "a desert canyon"]
STYLES = ["watercolor", "product photo", "isometric render"]

SCHEMA = pa.schema([
    ("id", pa.string()), ("task", pa.string()), ("model", pa.string()), ("prompt", pa.string()),
    ("negative_prompt", pa.string()), ("seed", pa.int64()), ("output_format", pa.string()),
    ("image_uri", pa.string()), ("mask_uri", pa.string()), ("class_label", pa.int64()),
    ("control_image_uris", pa.list_(pa.string())),
    ("loras", pa.list_(pa.struct([("uri", pa.string()), ("scale", pa.float64())]))),
    ("width", pa.int64()), ("height", pa.int64()), ("num_inference_steps", pa.int64()), ("num_frames", pa.int64()),
    ("campaign", pa.string()),
])

SIDE = 256
"""Demo outputs are rendered at the watermark's minimum side, so `renderfleet verify` passes on them."""
STEPS = 2
"""Few steps keep 256 px renders fast on two CPU cores."""

_MARKED = {"width": SIDE, "height": SIDE, "num_inference_steps": STEPS}


def demo_manifest(rows: int = 12) -> pa.Table:
    """Text-to-image over several models and formats, then one row of every other task and family."""
    records = []
    for i in range(rows):
        records.append({
            "id": f"image-{i:03d}",
            "model": ["tiny-sd", "tiny-sd", "tiny-sdxl", "tiny-lcm"][i % 4],
            "prompt": f"{SUBJECTS[i % len(SUBJECTS)]}, {STYLES[i % len(STYLES)]}",
            "negative_prompt": "blurry" if i % 2 else None,
            "seed": i if i % 3 == 0 else None,
            "output_format": ["png", "png", "webp", "jpeg"][i % 4],
            "campaign": f"demo-{i % 3}",
            **_MARKED,
        })
    src, mask, edges = "inputs/photo.png", "inputs/mask.png", "inputs/edges.png"
    records += [
        {"id": "lora-brand", "model": "tiny-sd", "prompt": "a sneaker, brand style", "loras": [{"uri": "tiny-lora-sd", "scale": 0.8}], **_MARKED},
        {"id": "cascade-if", "model": "tiny-if", "prompt": "a glass bottle on sand"},
        {"id": "class-cm", "model": "tiny-cm", "class_label": 3},
        {"id": "controlnet", "model": "tiny-sd-controlnet", "prompt": "a tower", "control_image_uris": [edges], **_MARKED},
        {"id": "edit-img2img", "task": "edit", "model": "tiny-sd-img2img", "prompt": "make it autumn", "image_uri": src, **_MARKED},
        {"id": "edit-inpaint", "task": "edit", "model": "tiny-sd-inpaint", "prompt": "a red door", "image_uri": src, "mask_uri": mask, **_MARKED},
        {"id": "edit-pix2pix", "task": "edit", "model": "tiny-pix2pix", "prompt": "turn it into a sketch", "image_uri": src, **_MARKED},
        {"id": "video-t2v", "task": "video", "model": "tiny-t2v", "prompt": "waves at night", **_MARKED, "num_frames": 4},
        {"id": "video-wan", "task": "video", "model": "tiny-wan", "prompt": "a drone shot of a forest", **_MARKED, "num_frames": 5},
        {"id": "mesh-shap-e", "task": "mesh", "model": "tiny-shap-e", "prompt": "a ceramic vase"},
        {"id": "audio-audioldm", "task": "audio", "model": "tiny-audioldm", "prompt": "a short jingle"},
        {"id": "audio-stable", "task": "audio", "model": "tiny-stable-audio", "prompt": "rain on a roof"},
    ]
    return pa.Table.from_pylist(records, schema=SCHEMA)


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def write_demo_inputs(out: str) -> None:
    """A source photo, an inpainting mask (transparent = repaint) and a control image, at the output size."""
    y, x = np.mgrid[0:SIDE, 0:SIDE]
    write_bytes(join(out, "inputs/photo.png"), _png(Image.fromarray(np.stack([x, y, (x + y) // 2], -1).astype(np.uint8))))
    mask = np.full((SIDE, SIDE, 4), 255, np.uint8)
    mask[SIDE // 4:3 * SIDE // 4, SIDE // 4:3 * SIDE // 4, 3] = 0
    write_bytes(join(out, "inputs/mask.png"), _png(Image.fromarray(mask, "RGBA")))
    edges = np.zeros((SIDE, SIDE), np.uint8)
    edges[::32, :] = 255
    edges[:, ::32] = 255
    write_bytes(join(out, "inputs/edges.png"), _png(Image.fromarray(edges).convert("RGB")))


def write_demo_manifest(out: str, rows: int = 12) -> str:
    write_demo_inputs(out)
    uri = join(out, "manifest.parquet")
    sink = io.BytesIO()
    pq.write_table(demo_manifest(rows), sink)
    write_bytes(uri, sink.getvalue())
    return uri
