"""Writes what the sections measured: bench.json, bench.md (one table, targets pass/miss) and a PNG per section.

Rewritten after every section, so a run that is killed keeps what it measured.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def write_all(out: Path, data: dict[str, Any]) -> None:
    """bench.json, then the plots, then bench.md (which links them)."""
    tmp = out / ".bench.json.tmp"
    tmp.write_text(json.dumps(data, indent=1, default=str))
    os.replace(tmp, out / "bench.json")
    plots = {name: plot(out, name, s["plot"]) for name, s in data["sections"].items() if s.get("plot")}
    (out / "bench.md").write_text(markdown(data, plots))


def _fmt(value: float, unit: str = "") -> str:
    text = f"{value:.3g}" if abs(value) < 1000 else f"{value:,.0f}"
    return f"{text} {unit}".strip() if unit not in ("", "x") else (f"{text}x" if unit == "x" else text)


def markdown(data: dict[str, Any], plots: dict[str, str | None]) -> str:
    """The results table: each section's headline figures, each target next to its figure."""
    m = data["machine"]
    lines = [
        f"# renderfleet bench{' (smoke: tiny sizes, figures not meaningful)' if data.get('smoke') else ''}",
        "",
        f"Command: `{data['command']}`  ",
        f"Machine: {m['cpus']} CPUs, {m['memory_gb']:.0f} GiB, {m['accelerator']}; {m['platform']}; Python {m['python']}, "
        f"torch {m['torch']}, ray {m['ray']}, diffusers {m['diffusers']}  ",
        f"Load average (1 min) at start {m['load_start']:.2f}, now {m['load_now']:.2f}: "
        f"{'a busy machine, figures are noisy' if max(m['load_start'], m['load_now']) > 0.5 * m['cpus'] else 'a quiet machine'}",
        "",
        "| section | figure | value | target | result |",
        "|---|---|---|---|---|",
    ]
    for name, s in data["sections"].items():
        if s.get("error"):
            lines.append(f"| {name} | failed | {s['error'][:120].replace('|', '/')} | | |")
            continue
        targets = {t["figure"]: t for t in s.get("targets", [])}
        shown = list(targets) + [k for k in s["figures"] if k not in targets][: max(0, 4 - len(targets))]
        for key in shown:
            t = targets.get(key)
            value = _fmt(s["figures"][key], s.get("units", {}).get(key, ""))
            lines.append(f"| {name} | {key} | {value} | {t['text'] if t else ''} | "
                         f"{('pass' if t['pass'] else 'miss') if t else ''} |")
    lines.append("")
    for name, s in data["sections"].items():
        lines += [f"## {s.get('title', name)}", ""]
        if s.get("error"):
            lines += [f"failed: `{s['error'][:2000]}`", ""]
            continue
        lines += [f"- {n}" for n in s.get("notes", [])]
        lines += [f"- settings: `{json.dumps(s.get('settings', {}), default=str)}`",
                  f"- section took {s.get('elapsed_s', 0):.0f} s", ""]
        lines += ["| figure | value |", "|---|---|"]
        lines += [f"| {k} | {_fmt(v, s.get('units', {}).get(k, ''))} |" for k, v in s["figures"].items()]
        if plots.get(name):
            lines += ["", f"![{name}]({plots[name]})"]
        lines.append("")
    return "\n".join(lines)


def plot(out: Path, name: str, spec: dict[str, Any]) -> str | None:
    """One PNG for a section's plot spec (bar, stacked or line); returns its file name."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=100)
    try:
        x, series = spec["x"], spec["series"]
        if spec["kind"] == "line":
            for label, ys in series.items():
                ax.plot(x, ys, marker="o", label=label, linestyle="--" if label == "target" else "-")
            ax.set_xticks(x)
            ax.set_xlabel(spec.get("xlabel", ""))
        elif spec["kind"] == "stacked":
            bottom = [0.0] * len(x)
            for label, ys in series.items():
                ax.bar([str(v) for v in x], ys, bottom=bottom, label=label)
                bottom = [b + y for b, y in zip(bottom, ys)]
        else:
            width = 0.8 / max(1, len(series))
            for i, (label, ys) in enumerate(series.items()):
                ax.bar([j + i * width for j in range(len(x))], ys, width=width, label=label)
            ax.set_xticks([j + width * (len(series) - 1) / 2 for j in range(len(x))], [str(v) for v in x])
        ax.set_title(spec.get("title", name))
        ax.set_ylabel(spec.get("ylabel", ""))
        if len(series) > 1 or spec["kind"] != "bar":
            ax.legend(fontsize=8)
        fig.tight_layout()
        file = f"bench-{name}.png"
        fig.savefig(out / file)
        return file
    finally:
        plt.close(fig)
