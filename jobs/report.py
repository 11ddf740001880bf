"""`renderfleet report OUT`: a self-contained static HTML gallery of a job's outputs.

Everything the page shows is inside it (thumbnails, media and mesh previews as data URIs):
it opens from local disk, from an S3 download or as an e-mail attachment, with no network.
"""

from __future__ import annotations

import base64
import html
import io
import json
import time
from collections import Counter

from PIL import Image

from pipelines.media.formats import format_for_path
from storage.fs import join, list_files, read_bytes, write_bytes
from storage.results import error_code, read_results, results_dir

MAX_GALLERY = 200
MAX_INLINE_MEDIA = 8 * 1024 * 1024
MAX_TABLE_ROWS = 2000

_CSS = """
body{font-family:system-ui,sans-serif;margin:1.5rem;color:#222}
h1{margin:0 0 .3rem}.muted{color:#666}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(220px,1fr));gap:12px;margin:1rem 0}
.card{border:1px solid #ddd;border-radius:6px;padding:8px;font-size:12px;overflow:hidden}
.card img,.card video{width:100%;height:auto;background:#eee}.card audio{width:100%}
table{border-collapse:collapse;font-size:12px;margin:.5rem 0}td,th{border:1px solid #ddd;padding:3px 6px;text-align:left}
.failed{background:#fee}.filtered{background:#ffe}
"""


def _data_uri(data: bytes, content_type: str) -> str:
    return f"data:{content_type};base64,{base64.b64encode(data).decode()}"


def _thumbnail(data: bytes, size: int = 256) -> str:
    image = Image.open(io.BytesIO(data)).convert("RGB")
    image.thumbnail((size, size))
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=85)
    return _data_uri(buf.getvalue(), "image/jpeg")


def _media(row: dict) -> str:
    """The card body for one ok row."""
    uri, task = row["output_uri"], row.get("task") or "image"
    fmt = format_for_path(uri)
    ext = uri.rsplit(".", 1)[-1].lower()
    mime = fmt.mime if fmt else "application/octet-stream"
    data = read_bytes(uri)
    if task in ("image", "edit") or mime.startswith("image/") and task == "video":
        return f'<img src="{_thumbnail(data) if task != "video" else _data_uri(data, mime)}" alt="{html.escape(row["id"])}">'
    if task == "video":
        if len(data) > MAX_INLINE_MEDIA:
            return f'<a href="{html.escape(uri)}">{html.escape(uri)}</a>'
        return f'<video controls muted loop preload="auto" src="{_data_uri(data, mime)}"></video>'
    if task == "audio":
        if len(data) > MAX_INLINE_MEDIA:
            return f'<a href="{html.escape(uri)}">{html.escape(uri)}</a>'
        return f'<audio controls preload="auto" src="{_data_uri(data, mime)}"></audio>'
    if task == "mesh":
        import trimesh

        from pipelines.media.mesh import preview_png

        mesh = trimesh.load(io.BytesIO(data), file_type=ext, force="mesh")
        return f'<img src="{_data_uri(preview_png(mesh, 256), "image/png")}" alt="mesh {html.escape(row["id"])}">'
    return html.escape(uri)


def _runs(out: str) -> list[dict]:
    runs = []
    for uri in list_files(join(out, "runs"), suffix=".json"):
        try:
            runs.append(json.loads(read_bytes(uri)))
        except (ValueError, OSError):
            continue
    return runs


def build_report(out: str) -> str:
    """The gallery page for OUT, as HTML text."""
    table = read_results(out)
    rows = table.to_pylist()
    statuses = Counter(r["status"] for r in rows)
    reasons = Counter(error_code(r["error"]) for r in rows if r["status"] == "failed")
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>renderfleet report</title><style>{_CSS}</style></head><body>",
             f"<h1>renderfleet report</h1><p class='muted'>{html.escape(out)} · generated {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}</p>",
             "<h2>Summary</h2><table><tr><th>rows</th>" + "".join(f"<th>{s}</th>" for s in ("ok", "failed", "filtered")) + "</tr>",
             f"<tr><td>{len(rows)}</td>" + "".join(f"<td>{statuses.get(s, 0)}</td>" for s in ("ok", "failed", "filtered")) + "</tr></table>"]
    by_task = Counter(r.get("task") or "image" for r in rows if r["status"] == "ok")
    if by_task:
        parts.append("<p>" + ", ".join(f"{n} {t}" for t, n in sorted(by_task.items())) + "</p>")
    runs = _runs(out)
    if runs:
        parts.append("<h2>Throughput</h2><table><tr><th>run</th><th>rows rendered</th><th>elapsed s</th><th>rows/s</th>"
                     "<th>rows/s after first output</th><th>model loads</th><th>workers</th></tr>")
        for r in sorted(runs, key=lambda r: r.get("run_id", "")):
            parts.append(f"<tr><td>{html.escape(str(r.get('run_id')))}</td><td>{r.get('rendered', 0)}</td><td>{r.get('elapsed_s', 0):.1f}</td>"
                         f"<td>{r.get('rows_per_s', 0):.2f}</td><td>{r.get('steady_rows_per_s', 0):.2f}</td>"
                         f"<td>{r.get('model_loads', 0)}</td><td>{r.get('workers', '')}</td></tr>")
        parts.append("</table>")
    ok = [r for r in rows if r["status"] == "ok"][:MAX_GALLERY]
    parts.append(f"<h2>Gallery</h2><p class='muted'>{len(ok)} of {statuses.get('ok', 0)} outputs</p><div class='grid'>")
    for r in ok:
        try:
            body = _media(r)
        except Exception as e:  # noqa: BLE001 - a missing or broken file is shown, not fatal
            body = f"<p class='failed'>cannot show {html.escape(r['output_uri'])}: {html.escape(str(e))}</p>"
        parts.append(f"<div class='card'>{body}<div><b>{html.escape(r['id'])}</b> · {html.escape(str(r.get('model')))} · "
                     f"{html.escape(r.get('task') or 'image')} · seed {r.get('seed')}</div></div>")
    parts.append("</div>")
    if reasons:
        parts.append("<h2>Failures by reason</h2><table><tr><th>reason</th><th>rows</th></tr>"
                     + "".join(f"<tr><td>{html.escape(k)}</td><td>{v}</td></tr>" for k, v in reasons.most_common()) + "</table>")
    parts.append(f"<h2>Results</h2><p class='muted'>{results_dir(out)}</p><table><tr><th>id</th><th>task</th><th>status</th>"
                 "<th>model</th><th>seed</th><th>size</th><th>render s</th><th>error</th><th>output</th></tr>")
    for r in rows[:MAX_TABLE_ROWS]:
        size = f"{r['width']}x{r['height']}" if r.get("width") else ""
        parts.append(f"<tr class='{r['status']}'><td>{html.escape(r['id'])}</td><td>{html.escape(r.get('task') or '')}</td>"
                     f"<td>{r['status']}</td><td>{html.escape(str(r.get('model')))}</td><td>{r.get('seed')}</td><td>{size}</td>"
                     f"<td>{(r.get('render_s') or 0):.3f}</td><td>{html.escape(r.get('error') or '')}</td>"
                     f"<td>{html.escape(r.get('output_uri') or '')}</td></tr>")
    if len(rows) > MAX_TABLE_ROWS:
        parts.append(f"<tr><td colspan='9'>… {len(rows) - MAX_TABLE_ROWS} more rows in the results dataset</td></tr>")
    parts.append("</table></body></html>")
    return "\n".join(parts)


def write_report(out: str) -> str:
    """Writes OUT/report.html and returns its URI."""
    uri = join(out, "report.html")
    write_bytes(uri, build_report(out).encode("utf-8"), content_type="text/html")
    return uri
