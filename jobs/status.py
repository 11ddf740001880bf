"""`renderfleet status OUT`: what a human (or, with --json, a script) needs to decide what to do next."""

from __future__ import annotations

import json

from storage.results import STATUSES, Summary, results_dir

FAILED_IDS_SHOWN = 20


def status_lines(out: str, s: Summary, show_all: bool = False) -> list[str]:
    """The status report: totals, counts by status and by failure reason, and the failed ids (first 20 unless all)."""
    lines = [f"results: {results_dir(out)}"]
    if s.manifest_total is not None:
        lines.append(f"manifest: {s.manifest_total} rows, {s.pending} without a result yet")
    else:
        lines.append("manifest: size unknown (no run summary under OUT/runs/)")
    lines.append(f"rows: {s.total}  " + "  ".join(f"{k}={s.by_status.get(k, 0)}" for k in STATUSES))
    lines += [f"  failed {reason}: {n}" for reason, n in s.failures.items()]
    if s.failed_ids:
        shown = s.failed_ids if show_all else s.failed_ids[:FAILED_IDS_SHOWN]
        more = len(s.failed_ids) - len(shown)
        lines.append(f"failed ids{f' (first {len(shown)} of {len(s.failed_ids)}; --all shows all)' if more else ''}:")
        lines += [f"  {i}" for i in shown]
    return lines


def status_json(out: str, s: Summary) -> str:
    """One JSON object: totals, counts, reasons and every failed id."""
    return json.dumps({"out": out, "results_dir": results_dir(out), **s.as_dict()}, indent=1)
