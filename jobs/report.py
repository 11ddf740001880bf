"""`renderfleet report OUT`: a static gallery of a job's outputs that opens from disk, with no server.

OUT/report.html holds the summary and a small vanilla-JS renderer; OUT/report-data.js holds one record
per result row (search, filters and paging run in the page, with no cap); OUT/report-thumbs/ holds
JPEG thumbnails. Full-size outputs are linked relative to OUT, so the folder can be moved or downloaded.
"""

from __future__ import annotations

import html
import json
import time
from collections import Counter

from jobs.gallery import DATA_FILE, gallery_records, write_gallery_data
from jobs.gallery_assets import CONTROLS, CSS, script
from storage.fs import join, list_files, read_bytes, write_bytes
from storage.results import error_code, read_results, results_dir


def _runs(out: str) -> list[dict]:
    runs = []
    for uri in list_files(join(out, "runs"), suffix=".json"):
        try:
            runs.append(json.loads(read_bytes(uri)))
        except (ValueError, OSError):
            continue
    return runs


def _summary(out: str, rows: list[dict]) -> list[str]:
    statuses = Counter(r["status"] for r in rows)
    parts = ["<h2>Summary</h2><table><tr><th>rows</th>" + "".join(f"<th>{s}</th>" for s in ("ok", "failed", "filtered")) + "</tr>",
             f"<tr><td>{len(rows)}</td>" + "".join(f"<td>{statuses.get(s, 0)}</td>" for s in ("ok", "failed", "filtered")) + "</tr></table>"]
    by_task = Counter(r.get("task") or "image" for r in rows if r["status"] == "ok")
    if by_task:
        parts.append("<p>" + ", ".join(f"{n} {t}" for t, n in sorted(by_task.items())) + "</p>")
    reasons = Counter(error_code(r["error"]) for r in rows if r["status"] == "failed")
    if reasons:
        parts.append("<h2>Failures by reason</h2><table><tr><th>reason</th><th>rows</th></tr>"
                     + "".join(f"<tr><td>{html.escape(k)}</td><td>{v}</td></tr>" for k, v in reasons.most_common()) + "</table>")
    return parts


def _throughput(out: str) -> list[str]:
    runs = _runs(out)
    if not runs:
        return []
    parts = ["<h2>Throughput</h2><table><tr><th>run</th><th>rows rendered</th><th>elapsed s</th><th>rows/s (after the first output)</th>"
             "<th>images/s</th><th>model loads</th><th>workers</th></tr>"]
    for r in sorted(runs, key=lambda r: r.get("run_id", "")):
        parts.append(f"<tr><td>{html.escape(str(r.get('run_id')))}</td><td>{r.get('rendered', 0)}</td><td>{r.get('elapsed_s', 0):.1f}</td>"
                     f"<td>{r.get('rows_per_s', 0):.2f}</td><td>{r.get('images_per_s', 0):.2f}</td>"
                     f"<td>{r.get('model_loads', 0)}</td><td>{html.escape(str(r.get('workers', '')))}</td></tr>")
    parts.append("</table>")
    return parts


def build_report(out: str) -> str:
    """Writes the gallery's data and thumbnails under OUT and returns the page, as HTML text."""
    table = read_results(out)
    rows = table.to_pylist()
    records = gallery_records(out, rows, has_prompt="prompt" in table.column_names)
    write_gallery_data(out, records)
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>renderfleet report</title><style>{CSS}</style></head><body>",
             f"<h1>renderfleet report</h1><p class='muted'>{html.escape(out)} · generated {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}"
             f" · results in {html.escape(results_dir(out))}</p>"]
    parts += _summary(out, rows) + _throughput(out)
    parts += ["<h2>Gallery</h2>", CONTROLS, f"<script src='{DATA_FILE}'></script>", f"<script>{script()}</script>", "</body></html>"]
    return "\n".join(parts)


def write_report(out: str) -> str:
    """Writes OUT/report.html (with OUT/report-data.js and OUT/report-thumbs/) and returns its URI."""
    uri = join(out, "report.html")
    write_bytes(uri, build_report(out).encode("utf-8"), content_type="text/html")
    return uri
