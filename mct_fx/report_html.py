"""A troubleshooting report as one self-contained HTML page (matplotlib PNGs embedded)."""

from __future__ import annotations

import base64
import html
import io
import math
from typing import Any

__all__ = ["render_html", "MAX_LAYER_PLOTS"]

MAX_LAYER_PLOTS = 12  # histograms for the worst flagged layers

_STYLE = """
body { font-family: sans-serif; margin: 2em; color: #222; }
table { border-collapse: collapse; font-size: 13px; }
th, td { border: 1px solid #ccc; padding: 3px 8px; text-align: left; }
th { background: #eee; }
tr.flagged td { background: #fde8e8; }
.plots img { max-width: 48%; margin: 4px; border: 1px solid #ddd; }
"""


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise ImportError("the HTML report draws its plots with matplotlib: pip install matplotlib "
                          "(or mct-fx[report])") from None
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    fig.clf()
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _grid(text: str) -> tuple[float, float] | None:
    try:
        lo, hi = (float(v) for v in text.split(".."))
    except ValueError:
        return None
    return lo, hi


def _sqnr_plot(plt, report: Any) -> str:
    c = report.comparison
    order = [c.layer(n) for n in c.graph_order]
    values = [min(r.metrics["sqnr"], 100.0) for r in order]
    colors = ["#d62728" if r.node in report.flagged else "#1f77b4" for r in order]
    fig = plt.figure(figsize=(max(6.0, 0.18 * len(order)), 3.2))
    ax = fig.add_subplot()
    ax.bar(range(len(order)), values, color=colors)
    ax.axhline(report.config.sqnr_db, color="gray", linestyle="--", linewidth=1)
    ax.set_xticks(range(len(order)), [r.node for r in order], rotation=90, fontsize=6)
    ax.set_ylabel("SQNR (dB)")
    ax.set_title("per-layer SQNR in graph order (red: flagged)")
    out = _png(fig)
    plt.close(fig)
    return out


def _layer_plot(plt, report: Any, node: str) -> str:
    row = report.comparison.layer(node)
    channels = row.stats.channel_absmax
    fig = plt.figure(figsize=(7.5, 2.8))
    ax = fig.add_subplot(1, 2 if channels else 1, 1)
    ax.hist(row.stats.sample, bins=80, color="#1f77b4", log=True)
    grid = _grid(row.grid)
    if grid is not None:
        for v in grid:
            ax.axvline(v, color="#d62728", linewidth=1)
    ax.set_title(f"{node}: float values, grid in red", fontsize=9)
    if channels:
        ax2 = fig.add_subplot(1, 2, 2)
        ax2.bar(range(len(channels)), channels, color="#ff7f0e")
        ax2.set_title("max |value| per channel", fontsize=9)
    out = _png(fig)
    plt.close(fig)
    return out


def _cell(v) -> str:
    if isinstance(v, float):
        return "inf" if v == math.inf else f"{v:.4g}"
    return html.escape(str(v))


def render_html(report: Any) -> str:
    """The page of a :class:`~mct_fx.troubleshoot_types.TroubleshootReport` (which imports this module, so it
    is read by its fields, not imported): summary, findings, the per-layer table (flagged rows red), plots."""
    plt = _pyplot()
    c = report.comparison
    e = html.escape
    parts = ["<!DOCTYPE html><html><head><meta charset='utf-8'><title>mct_fx troubleshooting report</title>",
             f"<style>{_STYLE}</style></head><body>", "<h1>Quantization troubleshooting report</h1>",
             f"<p>Reference: {e(c.reference)}. Output: "
             + ", ".join(f"{e(m)} {_cell(c.output[m])}" for m in c.metrics)
             + f". {len(report.flagged)} of {len(c.layers)} layers flagged.</p>",
             "<h2>Findings</h2>"]
    causes = [f for f in report.findings if f.cause != "inherited"]
    inherited = [f for f in report.findings if f.cause == "inherited"]
    if causes:
        parts.append("<table id='findings'><tr><th>layer</th><th>loss seen at</th><th>cause</th><th>evidence</th>"
                     "<th>try</th><th>output SQNR with it (dB)</th></tr>")
        for f in causes:
            measured = "" if f.measured is None or report.verify_baseline is None else (
                f"{_cell(f.measured)} (without it: {_cell(report.verify_baseline)})")
            parts.append(f"<tr><td>{e(f.node)}</td><td>{e(f.seen_at or f.node)}</td><td>{e(f.cause)}</td>"
                         f"<td>{e(f.evidence)}</td><td><code>{e(f.knob)}</code></td><td>{measured}</td></tr>")
        parts.append("</table>")
    elif not inherited:
        parts.append("<p>No layer is below the thresholds.</p>")
    if inherited:  # folded: they only point upstream
        parts.append(f"<details><summary>{len(inherited)} flagged layers only carry a flagged input's loss</summary>"
                     "<table id='inherited'><tr><th>layer</th><th>evidence</th><th>try</th></tr>")
        for f in inherited:
            parts.append(f"<tr><td>{e(f.node)}</td><td>{e(f.evidence)}</td><td>{e(f.knob)}</td></tr>")
        parts.append("</table></details>")
    parts.append("<h2>Plots</h2><div class='plots'>")
    parts.append(f"<img alt='per-layer SQNR' src='{_sqnr_plot(plt, report)}'>")
    causes = [f.node for f in report.findings if f.cause not in ("inherited", "unknown op")]
    plotted = list(dict.fromkeys([*causes, *report.flagged]))  # where a cause sits first, then the flagged layers
    known = {r.node for r in c.layers}
    for node in [n for n in plotted if n in known][:MAX_LAYER_PLOTS]:
        parts.append(f"<img alt='{e(node)} histogram' src='{_layer_plot(plt, report, node)}'>")
    parts.append("</div><h2>Layers (worst first)</h2>")
    validation = any(r.validation for r in c.layers)
    head = ["layer", "op", "weights", "activation", "grid", *c.metrics]
    head += [f"{m} (validation)" for m in c.metrics] if validation else []
    parts.append("<table id='layers'><tr>" + "".join(f"<th>{e(h)}</th>" for h in head) + "</tr>")
    for r in c.layers:
        cells = [r.node, r.op, r.weights, r.activation, r.grid, *(r.metrics[m] for m in c.metrics)]
        if validation:
            cells += [(r.validation or {}).get(m, "") for m in c.metrics]
        cls = " class='flagged'" if r.node in report.flagged else ""
        parts.append(f"<tr{cls}>" + "".join(f"<td>{_cell(v)}</td>" for v in cells) + "</tr>")
    parts.append("</table></body></html>")
    return "\n".join(parts)
