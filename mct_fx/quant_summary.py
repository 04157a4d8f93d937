"""Per-layer summary of a quantized GraphModule, read from the graph itself."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from torch import fx

from mct_fx.meta import Role, quantizer_nodes_by_role
from mct_fx.quantizers.modules import FakeQuantizer, WeightQuantizer
from mct_fx.tpc.matching import annotation, describe_target, produces_float
from mct_fx.tpc.vocabulary import LINEAR_OPS

if TYPE_CHECKING:
    from mct_fx.mixed_precision.search import MixedPrecisionResult

__all__ = ["LayerSummary", "QuantSummary", "summarize"]


@dataclass(frozen=True)
class LayerSummary:
    node: str
    op: str  # operator-set name ("?" for unknown ops)
    target: str  # module class / function name
    weights: str
    activation: str
    grid: str  # activation grid range, "lo..hi"


@dataclass(frozen=True)
class QuantSummary:
    """What was quantized how; ``unknown`` lists nodes left float because their op is unknown."""

    layers: tuple[LayerSummary, ...]
    unknown: tuple[str, ...]
    mixed_precision: MixedPrecisionResult | None = None  # the bit-width search's choice, when one ran

    def __str__(self) -> str:
        head = ("node", "op", "weights", "activation", "grid")
        rows = [head] + [(r.node, f"{r.op} ({r.target})", r.weights, r.activation, r.grid) for r in self.layers]
        widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        if self.unknown:
            lines.append(f"left float (op unknown to the vocabulary): {', '.join(self.unknown)}")
        if self.mixed_precision is not None:
            lines.append(str(self.mixed_precision))
        return "\n".join(lines)


def _describe(q: FakeQuantizer) -> str:
    sign = "" if q.method.value == "uniform" else (" signed" if q.signed else " unsigned")
    if q.method.symmetric_grid and q.zero_point.ndim == 0 and float(q.zero_point) != 0:
        sign += " shifted"  # shift-negative correction
    where = ""
    if isinstance(q, WeightQuantizer):
        where = " per-tensor" if q.axis is None else " per-channel"
    return f"{q.n_bits}b {q.method.value}{sign}{where}"


def summarize(gm: fx.GraphModule, mixed_precision: MixedPrecisionResult | None = None) -> QuantSummary:
    """Summarise every annotated node of a prepared or quantized ``gm``."""
    quantizers: dict[tuple[str, Role], FakeQuantizer] = {
        (record.node, record.role): gm.get_submodule(q.target) for q, record in quantizer_nodes_by_role(gm)}
    layers, unknown = [], []
    for node in gm.graph.nodes:
        ann = annotation(node)
        if ann is None:
            continue
        if ann.op is None and produces_float(node):
            unknown.append(node.name)
        elif not (ann.float_output or node.op == "call_function" and ann.op in LINEAR_OPS):
            continue  # sizes, shapes, asserts: nothing to report
        wq = quantizers.get((node.name, Role.WEIGHT))
        aq = quantizers.get((node.name, Role.ACTIVATION))
        weights = _describe(wq) if wq is not None else "-"
        if aq is not None:
            activation = _describe(aq)
            if aq.calibrated:
                lo, hi = aq.grid_range()
                grid = f"{float(lo):.4g}..{float(hi):.4g}"
            else:
                grid = "(not calibrated)"
        else:
            grid = ""
            if ann.op is None:
                activation = "float (unknown op)"
            elif not ann.float_output:
                activation = "-"
            elif ann.fused_into:
                activation = f"fused into {ann.fused_into}"
            elif ann.config.quantization_preserving:
                activation = "preserves input grid"
            else:
                activation = "not quantized"
        layers.append(LayerSummary(node.name, ann.op or "?", describe_target(node, gm), weights, activation, grid))
    return QuantSummary(tuple(layers), tuple(unknown), mixed_precision)
