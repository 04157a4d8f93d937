"""Troubleshooting: which layers lose accuracy, the likely cause of each, and the knob to try.

``troubleshoot(float_model, qmodel, loader)`` runs :func:`mct_fx.compare`, flags
the degraded layers (SQNR or cosine below a threshold, or a large drop from the
layer's inputs) and checks each, and the layers it reads, against the usual
causes, with the evidence: a low bit-width (chosen by mixed precision or set by
hand), a grid that clips a tail carrying much of the signal, activation outliers
(values many standard deviations out, where a tighter grid measurably helps, or
one channel far wider than the rest), a small negative tail on a signed grid
that shift-negative correction would fix, concatenated inputs of very different
ranges, and ops left float because the target does not know them.  Each knob
is a hypothesis from one layer's statistics; ``verify=True`` measures it
(:mod:`mct_fx.troubleshoot_verify`).  Writes ``report.json`` and a
self-contained ``report.html`` (:mod:`mct_fx.report_html`) when given a folder.
"""

from __future__ import annotations

import math
import os
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import replace
from typing import Any

import torch
from torch import fx, nn

from mct_fx.config import CONFIG_KEY
from mct_fx.graph_utils import attr_value
from mct_fx.measure import format_value, sqnr_db
from mct_fx.meta import SUMMARY, Role, quantizer_module, quantizer_node
from mct_fx.quant_summary import summarize
from mct_fx.quantizers.modules import FakeQuantizer
from mct_fx.report import LayerComparison, MetricLike, compare
from mct_fx.tpc.matching import annotation, describe_target
from mct_fx.troubleshoot_types import CAUSES, INHERIT_DB, Finding, TroubleshootConfig, TroubleshootReport

__all__ = ["troubleshoot", "TroubleshootConfig", "TroubleshootReport", "Finding", "CAUSES"]

def _quantizer(gm: fx.GraphModule, node: str, role: Role = Role.ACTIVATION) -> FakeQuantizer | None:
    q = quantizer_module(gm, node, role)
    return q if isinstance(q, FakeQuantizer) else None


def _flag(row: LayerComparison, rows: dict[str, LayerComparison], cfg: TroubleshootConfig) -> bool:
    sqnr, cos = row.metrics.get("sqnr"), row.metrics.get("cosine")
    if sqnr is not None and sqnr < cfg.sqnr_db or cos is not None and cos < cfg.cosine:
        return True
    inputs = [rows[i].metrics["sqnr"] for i in row.inputs if i in rows and "sqnr" in rows[i].metrics]
    # a large drop matters only where the result is not good anyway (60 -> 45 dB is no problem)
    return (sqnr is not None and bool(inputs) and min(inputs) - sqnr >= cfg.drop_db
            and sqnr < cfg.sqnr_db + cfg.drop_db)


def _wider(gm: fx.GraphModule, node: str) -> str | None:
    """An override with more activation bits, when the target offers them for ``node`` (else None)."""
    n = next((m for m in gm.graph.nodes if m.name == node), None)
    ann = annotation(n) if n is not None else None
    if ann is None or ann.options is None or ann.config is None:
        return None
    bits = max(c.activation_n_bits for c in ann.options.candidates)
    return f"LayerOverride(name='{node}', activation_n_bits={bits})" if bits > ann.config.activation_n_bits else None


def _or_wider(text: str, gm: fx.GraphModule, node: str) -> str:
    wider = _wider(gm, node)
    return f"{text}, or {wider}" if wider else text


def _activationsqnr_db(gm: fx.GraphModule, row: LayerComparison) -> float | None:
    """SQNR (dB) of the layer's float values on its own activation grid: what that grid alone loses."""
    quantizer = _quantizer(gm, row.node)
    if quantizer is None or not row.stats.sample or quantizer.scale.numel() != 1:
        return None
    values = torch.tensor(row.stats.sample, device=quantizer.scale.device)
    with torch.no_grad():
        return sqnr_db(values, quantizer(values))


def _weightsqnr_db(gm: fx.GraphModule, node: str) -> float | None:
    """SQNR (dB) of a layer's kernel against its quantized self: how much the weight grid alone loses."""
    qnode = quantizer_node(gm, node, Role.WEIGHT)
    quantizer = gm.get_submodule(qnode.target) if qnode is not None else None
    weight = attr_value(gm, qnode.args[0]) if qnode is not None and qnode.args else None
    if not isinstance(quantizer, FakeQuantizer) or weight is None:
        return None
    with torch.no_grad():
        return sqnr_db(weight.detach(), quantizer(weight))


def _low_bits(node: str, gm: fx.GraphModule, cfg: TroubleshootConfig, mixed: Any) -> list[Finding]:
    out = []
    for role, label, field in ((Role.WEIGHT, "weights", "weights_n_bits"),
                               (Role.ACTIVATION, "activations", "activation_n_bits")):
        q = _quantizer(gm, node, role)
        if q is None or q.n_bits > cfg.low_bits:
            continue
        pin = f"LayerOverride(name='{node}', {field}=8)"
        if mixed is not None and node in mixed.bits:
            why = f"mixed precision chose {mixed.bits[node]} under {mixed.target}"
            knob = f"raise the ResourceUtilization budget, or pin this layer: {pin}"
        else:
            why, knob = "set by the target's base configuration or an override", pin
        out.append(Finding(node, "low bit-width", f"{q.n_bits}-bit {label} ({why}).", knob,
                           change={"override": {"name": node, field: 8}}))
    return out


def _clipping(row: LayerComparison, gm: fx.GraphModule, cfg: TroubleshootConfig, quant_config: Any) -> list[Finding]:
    """The activation grid cuts off values that carry much of the signal (a threshold search or z-score filter
    that traded the tail for resolution where the tail matters)."""
    quantizer = _quantizer(gm, row.node)
    if quantizer is None or not row.stats.sample or quantizer.scale.numel() != 1 or not quantizer.affine:
        return []
    values = torch.tensor(row.stats.sample, device=quantizer.scale.device)
    lo, hi = (float(v) for v in quantizer.grid_range())
    clip_sqnr = sqnr_db(values, values.clamp(lo, hi))
    if clip_sqnr >= cfg.clip_sqnr_db:
        return []
    beyond = float(((values < lo) | (values > hi)).float().mean()) * 100
    z = getattr(quant_config, "z_threshold", math.inf)
    knob = f"LayerOverride(name='{row.node}', activation_error_method='noclipping')"
    change = {"override": {"name": row.node, "activation_error_method": "noclipping"}}
    if math.isfinite(z):
        knob = f"QuantConfig(z_threshold=math.inf) (now {z:g}: the outlier filter drops the tail), or {knob}"
        change = {"z_threshold": math.inf}
    return [Finding(row.node, "clipping",
                    f"the grid {lo:.4g}..{hi:.4g} clips values reaching {row.stats.min:.4g}..{row.stats.max:.4g} "
                    f"({beyond:.2g}% of them); the clipping alone leaves {clip_sqnr:.1f} dB.", knob, change=change)]


def _outliers(row: LayerComparison, gm: fx.GraphModule, cfg: TroubleshootConfig,
              z_threshold: float | None) -> list[Finding]:
    s, out = row.stats, []
    channels = [c for c in s.channel_absmax if math.isfinite(c)]
    if len(channels) >= 4:
        median = statistics.median(channels)
        top = max(range(len(channels)), key=channels.__getitem__)
        if median > 0 and channels[top] >= cfg.channel_ratio * median:
            out.append(Finding(row.node, "outlier channel",
                               f"channel {top} reaches {channels[top]:.4g} while the median channel reaches "
                               f"{median:.4g} ({channels[top] / median:.0f}x): one per-tensor grid leaves the "
                               "other channels few codes.",
                               _or_wider("QuantConfig(activation_channel_equalization=True) (balances channels "
                                         "across layer -> ReLU -> layer)", gm, row.node),
                               change={"activation_channel_equalization": True}))
    quantizer = _quantizer(gm, row.node)
    if s.std > 0 and quantizer is not None and s.sample:
        z = max(s.max - s.mean, s.mean - s.min) / s.std
        clipped = z_threshold is not None and z_threshold <= z  # the grid search already ignores them
        if z >= cfg.outlier_z and not clipped:
            # advise clipping only where these values say it pays: a grid over mean +- z/2 std, same bits
            values = torch.tensor(s.sample)
            half = cfg.outlier_z / 2
            lo, hi = max(s.min, s.mean - half * s.std), min(s.max, s.mean + half * s.std)
            step = (hi - lo) / (2 ** quantizer.n_bits - 1)
            proposed = sqnr_db(values, ((values.clamp(lo, hi) - lo) / step).round() * step + lo)
            now = _activationsqnr_db(gm, row)
            if now is not None and proposed >= now + 3:
                current = "off" if z_threshold is None or math.isinf(z_threshold) else f"{z_threshold:g}"
                out.append(Finding(row.node, "outliers",
                                   f"values reach {z:.0f} standard deviations from the mean (range {s.min:.4g}.."
                                   f"{s.max:.4g}, std {s.std:.4g}); on these values a grid clipped at {half:g} std "
                                   f"gives {proposed:.1f} dB, the current grid {now:.1f} dB.",
                                   f"QuantConfig(z_threshold={half:g}) (now {current})",
                                   change={"z_threshold": half}))
    return out


def _negative_tail(row: LayerComparison, gm: fx.GraphModule, cfg: TroubleshootConfig, config: Any) -> list[Finding]:
    q = _quantizer(gm, row.node)
    s = row.stats
    if q is None or not q.signed or not q.method.symmetric_grid or s.min >= 0 or s.max <= 0:
        return []
    if q.zero_point.numel() == 1 and float(q.zero_point) != 0:
        return []  # already shifted
    ratio = -s.min / s.max
    if ratio > cfg.negative_tail_ratio:
        return []
    change = None
    threshold = float(q.grid_range()[1].max())  # SNC compares the tail with the grid's threshold, not the max
    needed = round(min(0.99, -s.min / threshold * 1.1 + 0.005), 2)
    if config is not None and (not config.shift_negative_correction or needed > config.shift_negative_ratio):
        change = {"shift_negative_correction": True}
        if needed > config.shift_negative_ratio:
            change["shift_negative_ratio"] = needed
        knob = "QuantConfig(" + ", ".join(f"{k}={v}" for k, v in change.items()) + ")"
        if needed > config.shift_negative_ratio:
            knob += f" (shift_negative_ratio now {config.shift_negative_ratio:g})"
    else:
        knob = _or_wider("shift-negative correction did not apply here (the op or its consumers cannot absorb "
                         "the shift)", gm, row.node)
    return [Finding(row.node, "negative tail",
                    f"range {s.min:.4g}..{s.max:.4g}: the negative side is {ratio:.0%} of the positive, yet the "
                    "signed grid spends half its codes on it.", knob, change=change)]


def _concat(row: LayerComparison, gm: fx.GraphModule, rows: dict[str, LayerComparison],
            cfg: TroubleshootConfig) -> list[Finding]:
    node = next(n for n in gm.graph.nodes if n.name == row.node)
    ann = annotation(node)
    if ann is None or ann.op != "Concatenate":
        return []
    ranges = {i: max(abs(rows[i].stats.min), abs(rows[i].stats.max)) for i in row.inputs if i in rows}
    ranges = {k: v for k, v in ranges.items() if math.isfinite(v) and v > 0}
    if len(ranges) < 2:
        return []
    small, large = min(ranges, key=ranges.get), max(ranges, key=ranges.get)
    if ranges[large] < cfg.concat_ratio * ranges[small]:
        return []
    return [Finding(row.node, "unbalanced concat",
                    f"input {large} reaches {ranges[large]:.4g}, input {small} only {ranges[small]:.4g} "
                    f"({ranges[large] / ranges[small]:.0f}x): on the concat's one grid the small input gets few codes.",
                    _or_wider("balance the branches before the concat (rescale the smaller one's producer)",
                              gm, row.node))]


def _unexplained_knob(row: LayerComparison, act_sqnr: float | None) -> str:
    if act_sqnr is not None and act_sqnr < row.metrics["sqnr"] + 3:  # its own activation grid is the bottleneck
        return (f"its activation grid is the bottleneck (range vs resolution): try LayerOverride(name='{row.node}', "
                "activation_error_method='mse'|'mae'|'noclipping') or QuantConfig(z_threshold=...)")
    return ("errors accumulate here: QuantConfig(optq=OPTQConfig()) (rounding with error feedback, seconds), "
            "mct_fx.gptq (learned rounding against the float model) or weights_error_method='hmse'")


def _causes(row: LayerComparison, gm: fx.GraphModule, rows: dict[str, LayerComparison], cfg: TroubleshootConfig,
            mixed: Any, quant_config: Any) -> list[Finding]:
    """Every known cause found at ``row`` (its own grid, bits and float values)."""
    found = [f for n in (*row.fused, row.node) for f in _low_bits(n, gm, cfg, mixed)]
    if _quantizer(gm, row.node) is not None:  # value checks only where values are quantized
        clipped = _clipping(row, gm, cfg, quant_config)  # the tail matters here: no advice to clip more
        found += clipped or _outliers(row, gm, cfg, getattr(quant_config, "z_threshold", None))
    return found + _negative_tail(row, gm, cfg, quant_config) + _concat(row, gm, rows, cfg)


def troubleshoot(float_model: nn.Module, qmodel: fx.GraphModule, loader: Iterable,
                 config: TroubleshootConfig | None = None, *, validation: Iterable | None = None,
                 metrics: Sequence[MetricLike] = ("sqnr", "cosine", "mse"), n_batches: int | None = None,
                 out_dir: str | os.PathLike | None = None, verify: bool = False,
                 verbose: bool = True) -> TroubleshootReport:
    """Flag the degraded layers of ``qmodel`` and name a likely cause for each (see the module docstring).

    ``verify``: quantize again with each suggested configuration change (up to
    ``config.max_verify`` distinct ones) and record the output SQNR it gives
    (``Finding.measured``; see :mod:`mct_fx.troubleshoot_verify`).  With ``out_dir``,
    writes ``report.json`` and ``report.html`` there; ``verbose`` prints the summary.
    Neither model is modified.
    """
    cfg = config or TroubleshootConfig()
    metrics = tuple(metrics) if not isinstance(metrics, str) else (metrics,)
    if "sqnr" not in metrics:
        metrics = ("sqnr", *metrics)  # the flags and the drop test read it
    comparison = compare(float_model, qmodel, loader, metrics, validation=validation, n_batches=n_batches)
    rows = {r.node: r for r in comparison.layers}
    nodes = {n.name: n for n in qmodel.graph.nodes}
    quant_config = qmodel.meta.get(CONFIG_KEY)
    summary = qmodel.meta.get(SUMMARY) or summarize(qmodel)
    flagged = tuple(r.node for r in comparison.layers if _flag(r, rows, cfg))
    flagged_set = set(flagged)
    findings: list[Finding] = []
    seen: set[tuple[str, str]] = set()
    causes: dict[str, list[Finding]] = {}  # per layer, computed once though several flagged layers read it
    for name in (n for n in comparison.graph_order if n in flagged_set):  # upstream first: causes attach there
        row = rows[name]
        found = []
        for cand in (row, *(rows[i] for i in row.inputs if i in rows)):  # a cause may sit in what the layer reads
            if cand.node not in causes:
                causes[cand.node] = _causes(cand, qmodel, rows, cfg, summary.mixed_precision, quant_config)
            for f in causes[cand.node]:
                found.append(f)
                if (f.node, f.cause) not in seen:
                    seen.add((f.node, f.cause))
                    findings.append(f if f.node == name else replace(f, seen_at=name))
        worst = min((i for i in row.inputs if i in flagged_set), key=lambda i: rows[i].metrics["sqnr"], default=None)
        if not found and worst is not None and row.metrics["sqnr"] > rows[worst].metrics["sqnr"] - INHERIT_DB:
            findings.append(Finding(name, "inherited",
                                    f"SQNR {format_value(row.metrics['sqnr'])} dB, within {INHERIT_DB:g} dB of "
                                    "(or above) "
                                    f"its flagged input {worst} ({format_value(rows[worst].metrics['sqnr'])} dB).",
                                    f"fix {worst} first"))
        elif not found:
            inputs = [f"{i} {format_value(rows[i].metrics['sqnr'])} dB" for i in row.inputs if i in rows]
            weights = [format_value(v) for n in (*row.fused, name) if (v := _weightsqnr_db(qmodel, n)) is not None]
            act = _activationsqnr_db(qmodel, row)
            alone = ([f"its activation grid {format_value(act)} dB"] if act is not None else []) + (
                [f"its kernel grid {', '.join(weights)} dB"] if weights else [])
            found = [Finding(name, "unexplained",
                             f"SQNR {format_value(row.metrics['sqnr'])} dB"
                             + (f" (inputs: {', '.join(inputs)})" if inputs else "")
                             + (f"; alone, {' and '.join(alone)}." if alone else "."),
                             _or_wider(_unexplained_knob(row, act), qmodel, name))]
            findings += found
    for name in summary.unknown:
        node = nodes.get(name)
        target = describe_target(node, qmodel) if node is not None else "?"
        findings.append(Finding(name, "unknown op",
                                f"{target} is not in the target's operator vocabulary: it runs in float, and so "
                                "do the values it passes on unless a later layer quantizes them.",
                                "replace it by a supported op, or teach the TPC the op (mct_fx.tpc)"))
    if verify:
        from mct_fx.troubleshoot_verify import verify_findings

        findings, baseline = verify_findings(findings, float_model, qmodel, loader, n_batches=n_batches,
                                             limit=cfg.max_verify)
    else:
        baseline = None
    report = TroubleshootReport(comparison, flagged, tuple(findings), cfg, baseline)
    if out_dir is not None:
        report.write(out_dir)
    if verbose:
        print(report.summary())
    return report
