"""Small helpers shared by the tests: manifests, video probing, loading saved pipelines."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from storage.fs import write_bytes

MANIFEST_TYPES = {
    "id": pa.string(), "task": pa.string(), "model": pa.string(), "prompt": pa.string(),
    "negative_prompt": pa.string(), "seed": pa.int64(), "num_inference_steps": pa.int64(),
    "guidance_scale": pa.float64(), "width": pa.int64(), "height": pa.int64(), "output_format": pa.string(),
}


def write_manifest(uri: str, records: list[dict[str, Any]]) -> str:
    """Writes records as a Parquet manifest (local path or s3://), known columns typed as the schema wants."""
    names: list[str] = []
    for r in records:
        names += [k for k in r if k not in names]
    fields = [pa.field(n, MANIFEST_TYPES.get(n) or pa.array([r.get(n) for r in records]).type) for n in names]
    table = pa.Table.from_pylist(records, schema=pa.schema(fields))
    sink = io.BytesIO()
    pq.write_table(table, sink)
    write_bytes(uri, sink.getvalue())
    return uri


def load_pipeline(directory: str | Path, pipeline_class: str | None = None, **components: Any) -> Any:
    """Loads a saved model as workers load real checkpoints: `from_pretrained` (safetensors only), then
    `from_pipe` into `pipeline_class` (handing it `components`, e.g. controlnet) where the entry names one."""
    import diffusers

    pipe = diffusers.DiffusionPipeline.from_pretrained(str(directory), use_safetensors=True)
    if pipeline_class and (components or type(pipe).__name__ != pipeline_class):
        pipe = getattr(diffusers, pipeline_class).from_pipe(pipe, **components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def probe_video(path: str) -> dict[str, Any]:
    """Codec, size, fps and frame count as the bundled ffmpeg (a reader we did not write) sees them."""
    import re
    import subprocess

    import imageio_ffmpeg

    ffmpeg = imageio_ffmpeg.get_ffmpeg_exe()
    info = subprocess.run([ffmpeg, "-hide_banner", "-i", path], capture_output=True, text=True).stderr
    m = re.search(r"Video: (\w+).*?, (\d+)x(\d+).*?, ([\d.]+) fps", info)
    assert m, info
    count = subprocess.run([ffmpeg, "-hide_banner", "-i", path, "-map", "0:v", "-c", "copy", "-f", "null", "-"],
                           capture_output=True, text=True).stderr
    frames = int(re.findall(r"frame=\s*(\d+)", count)[-1])
    return {"codec": m.group(1), "width": int(m.group(2)), "height": int(m.group(3)), "fps": float(m.group(4)),
            "frames": frames, "info": info}
