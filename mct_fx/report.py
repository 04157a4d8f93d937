"""Per-layer comparison of a float model and its quantized version (``mct_fx.compare``).

Every layer of the quantized graph is compared on its output as the next layer
reads it (after its activation quantizer), against the same node of a float
reference: the float model prepared again the same way (same passes, same node
names; BN folding and collapsing keep the float function), run with its
quantizers off.  Where that is not possible (a model quantized by an older
version, or a graph that prepares differently), the reference is the quantized
model itself with its quantizers off, and the comparison says so.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, fx, nn

from mct_fx.data import iter_batches, to_device
from mct_fx.graph_utils import model_device
from mct_fx.measure import Accumulator, energy_ratio_db, flat_outputs, format_value, jsonable, run_recorded, sqnr_db
from mct_fx.meta import Role, quantizer_nodes_by_role
from mct_fx.prepare import float_reference
from mct_fx.quant_summary import summarize
from mct_fx.quantizers.modules import FakeQuantizer, quantizers_off
from mct_fx.tpc.matching import measured_view

__all__ = ["compare", "output_sqnr", "sqnr_db", "energy_ratio_db", "jsonable", "Comparison", "LayerComparison",
           "ActivationStats", "METRICS"]

HIGHER_IS_BETTER = {"sqnr": True, "cosine": True, "mse": False}
METRICS = tuple(HIGHER_IS_BETTER)
SAMPLE_VALUES = 4096  # float activation values kept per layer for histograms
MetricLike = str | Callable[[Tensor, Tensor], Any]


@dataclass(frozen=True)
class ActivationStats:
    """The float activation of a layer, over the representative data."""

    min: float
    max: float
    mean: float
    std: float
    channel_absmax: tuple[float, ...]  # per channel (dim 1) for tensors of rank >= 2; () otherwise
    sample: tuple[float, ...]  # up to SAMPLE_VALUES values, for plots

    def to_dict(self) -> dict[str, Any]:
        return {"min": self.min, "max": self.max, "mean": self.mean, "std": self.std,
                "channel_absmax": list(self.channel_absmax)}


@dataclass(frozen=True)
class LayerComparison:
    node: str
    op: str
    weights: str
    activation: str
    grid: str  # activation grid range "lo..hi" ("" when not quantized)
    metrics: dict[str, float]
    validation: dict[str, float] | None
    stats: ActivationStats
    inputs: tuple[str, ...] = ()  # the compared layers this one reads (for concat diagnosis)
    fused: tuple[str, ...] = ()  # nodes fused into this one (conv -> ReLU: the conv), compared at its output

    def to_dict(self) -> dict[str, Any]:
        return {"node": self.node, "op": self.op, "weights": self.weights, "activation": self.activation,
                "grid": self.grid, "metrics": self.metrics, "validation": self.validation,
                "inputs": list(self.inputs), "fused": list(self.fused), "stats": self.stats.to_dict()}


@dataclass(frozen=True)
class Comparison:
    """Per-layer metrics, worst layer first by the first metric; ``output``: the model's output."""

    layers: tuple[LayerComparison, ...]
    output: dict[str, float]
    output_validation: dict[str, float] | None
    metrics: tuple[str, ...]
    reference: str
    graph_order: tuple[str, ...] = field(default=())  # layer names in execution order

    def layer(self, node: str) -> LayerComparison:
        for row in self.layers:
            if row.node == node:
                return row
        raise KeyError(f"no compared layer named {node!r}")

    def to_dict(self) -> dict[str, Any]:
        return {"metrics": list(self.metrics), "reference": self.reference, "graph_order": list(self.graph_order),
                "output": jsonable(self.output),
                "output_validation": jsonable(self.output_validation),
                "layers": [jsonable(r.to_dict()) for r in self.layers]}

    def __str__(self) -> str:
        head = ["node", "op", "weights", "activation", *self.metrics]
        if any(r.validation for r in self.layers):
            head += [f"{m} (val)" for m in self.metrics]
        rows = [head]
        for r in (*self.layers, None):
            metrics = self.output if r is None else r.metrics
            validation = self.output_validation if r is None else r.validation
            cells = ["(output)", "", "", ""] if r is None else [r.node, r.op, r.weights, r.activation]
            cells += [format_value(metrics[m]) for m in self.metrics]
            if len(head) > len(cells):
                cells += [format_value(validation[m]) if validation else "" for m in self.metrics]
            rows.append(cells)
        widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
        lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        return f"reference: {self.reference}\n" + "\n".join(lines)


# ------------------------------------------------------------------ metrics


class _Stats:
    """Running float-activation statistics of one layer."""

    def __init__(self):  # the running values become device tensors: read once, in result()
        self.lo, self.hi, self.sum, self.sq, self.n = math.inf, -math.inf, 0.0, 0.0, 0
        self.channel: Tensor | None = None
        self.sample: list[float] = []

    def update(self, x: Tensor) -> None:
        x = x.detach().float()
        if not x.numel():
            return
        x = torch.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0) if not torch.isfinite(x).all() else x
        lo, hi = torch.aminmax(x)
        self.lo, self.hi = (lo, hi) if self.n == 0 else (torch.minimum(self.lo, lo), torch.maximum(self.hi, hi))
        self.sum = self.sum + x.sum(dtype=torch.float64)
        self.sq = self.sq + x.square().sum(dtype=torch.float64)
        self.n += x.numel()
        if x.dim() >= 2 and x.shape[1] > 1:
            amax = x.abs().amax(dim=[d for d in range(x.dim()) if d != 1])
            self.channel = amax if self.channel is None else torch.maximum(self.channel, amax)
        if len(self.sample) < SAMPLE_VALUES:
            g = torch.Generator().manual_seed(len(self.sample))
            flat = x.reshape(-1)
            index = torch.randint(flat.numel(), (SAMPLE_VALUES - len(self.sample),), generator=g)
            self.sample.extend(flat[index.to(flat.device)].tolist())

    def result(self) -> ActivationStats:
        n = max(self.n, 1)
        mean = float(self.sum) / n
        std = math.sqrt(max(float(self.sq) / n - mean * mean, 0.0))
        channel = tuple(self.channel.tolist()) if self.channel is not None else ()
        return ActivationStats(float(self.lo), float(self.hi), mean, std, channel, tuple(self.sample))


def _metric_names(metrics: Sequence[MetricLike]) -> tuple[tuple[str, ...], dict[str, Callable]]:
    if isinstance(metrics, str) or callable(metrics):
        metrics = (metrics,)
    if not metrics:
        raise ValueError("compare: give at least one metric")
    names, customs = [], {}
    for m in metrics:
        if isinstance(m, str):
            if m not in HIGHER_IS_BETTER:
                raise ValueError(f"compare: unknown metric {m!r}; built in: {list(METRICS)}, or pass a function "
                                 "(float_output, quantized_output) -> number (an error: higher is worse)")
            names.append(m)
        elif callable(m):
            name = getattr(m, "__name__", None) or f"metric{len(customs)}"
            customs[name] = m
            names.append(name)
        else:
            raise TypeError(f"compare: a metric is a name or a function, got {type(m).__name__}")
    if len(set(names)) != len(names):
        raise ValueError(f"compare: metric names repeat: {names}")
    return tuple(names), customs


def _badness(row_metrics: dict[str, float], name: str) -> float:
    v = row_metrics[name]
    return -v if HIGHER_IS_BETTER.get(name, False) else v


def _taps(gm: fx.GraphModule, layers: Iterable[str]) -> dict[str, str]:
    """``{node to record: layer}``: a layer's activation quantizer when it has one, else the layer itself."""
    nodes = {n.name: n for n in gm.graph.nodes}
    quantizer = {record.node: q.name for q, record in quantizer_nodes_by_role(gm, Role.ACTIVATION)}
    taps = {}
    for layer in layers:
        if layer not in nodes:
            continue
        taps[quantizer.get(layer, layer)] = layer
    return taps


def _groups(rows: dict) -> dict[str, tuple[str, ...]]:
    """``{layer: fused inner nodes}``: a node whose activation is fused into a later one (conv -> ReLU) is
    one layer with it on the hardware, so it is compared at the group's output, not on its own."""
    fused = {}
    for name, row in rows.items():
        if row.activation.startswith("fused into ") and row.activation[len("fused into "):] in rows:
            fused[name] = row.activation[len("fused into "):]
    return {name: tuple(m for m, out in fused.items() if out == name) for name in rows if name not in fused}


def _layer_inputs(gm: fx.GraphModule, groups: dict[str, tuple[str, ...]]) -> dict[str, tuple[str, ...]]:
    """For each layer (group), the compared layers whose (quantized) outputs it reads."""
    quantized_from = {q.name: record.node for q, record in quantizer_nodes_by_role(gm, Role.ACTIVATION)}
    owner = {m: name for name, members in groups.items() for m in (*members, name)}
    nodes = {n.name: n for n in gm.graph.nodes}
    out = {}
    for name, members in groups.items():
        found = []
        for member in (*members, name):
            for a in nodes[member].all_input_nodes:
                source = owner.get(quantized_from.get(a.name, a.name))
                if source is not None and source != name and source not in found:
                    found.append(source)
        out[name] = tuple(found)
    return out


def _reference(float_model: nn.Module, qmodel: fx.GraphModule, example: Any,
               taps: dict[str, str]) -> tuple[fx.GraphModule, str]:
    """The float graph to compare against, and what it is."""
    try:
        ref = float_reference(float_model, example, qmodel)
    except Exception:  # noqa: BLE001 - any failure: fall back to the quantizers-off twin below
        ref = None
    if ref is not None and set(taps) <= {n.name for n in ref.graph.nodes}:
        return ref, "float model (prepared again: same passes and node names, quantizers off)"
    return copy.deepcopy(qmodel), "quantized model with its quantizers off (the float model could not be aligned)"


def _measure(ref: fx.GraphModule, qmodel: fx.GraphModule, taps: dict[str, str], ref_taps: dict[str, str],
             loader: Iterable, n_batches: int | None, names: tuple[str, ...], customs: dict[str, Callable],
             stats: dict[str, _Stats] | None) -> tuple[dict[str, dict[str, float]], dict[str, float]]:
    device = model_device(qmodel)
    acc = {layer: Accumulator(customs) for layer in taps.values()}
    out_acc = Accumulator(customs)
    float_values: dict[str, Tensor] = {}  # this batch's float outputs, until the quantized run scores them

    def keep(layer: str, t: Tensor) -> None:
        float_values[layer] = t
        if stats is not None and layer in stats:
            stats[layer].update(t)

    def score(layer: str, t: Tensor) -> None:
        ref_t = float_values.pop(layer, None)
        if ref_t is not None and ref_t.shape == t.shape:
            acc[layer].update(ref_t, t)

    for inputs in iter_batches(loader, n_batches):
        inputs = to_device(inputs, device)
        float_values.clear()
        with quantizers_off(ref):
            ref_out = run_recorded(ref, ref_taps, inputs, keep)
        q_out = run_recorded(qmodel, taps, inputs, score)
        out_acc.update(flat_outputs(ref_out), flat_outputs(q_out))
    return {layer: a.result(names) for layer, a in acc.items() if a.batches}, out_acc.result(names)


def output_sqnr(float_model: nn.Module, qmodel: nn.Module, loader: Iterable, n_batches: int | None = None) -> float:
    """SQNR (dB) of ``qmodel``'s output against ``float_model``'s over ``loader`` (all output tensors)."""
    acc = Accumulator({})
    device = model_device(qmodel)
    for inputs in iter_batches(loader, n_batches):
        args, kwargs = to_device(inputs, device)
        with torch.no_grad():
            ref, out = float_model(*args, **kwargs), qmodel(*args, **kwargs)
        acc.update(flat_outputs(ref), flat_outputs(out))
    return acc.result(("sqnr",))["sqnr"]


def compare(float_model: nn.Module, qmodel: fx.GraphModule, loader: Iterable,
            metrics: Sequence[MetricLike] = ("sqnr", "cosine", "mse"), *, validation: Iterable | None = None,
            n_batches: int | None = None) -> Comparison:
    """Per-layer similarity of ``qmodel`` to ``float_model`` on ``loader`` (and ``validation``).

    ``metrics``: names among ``METRICS`` ("sqnr" in dB, "cosine" per sample, "mse")
    or functions ``(float_output, quantized_output) -> number`` (errors: higher is
    worse), averaged over batches.  Rows are sorted worst first by the first metric;
    each carries the float activation's statistics (range, mean, std, per-channel
    maxima) that :func:`mct_fx.troubleshoot` reads.  Neither model is modified.
    """
    if not isinstance(qmodel, fx.GraphModule) or not any(isinstance(m, FakeQuantizer) for m in qmodel.modules()):
        raise ValueError("compare: qmodel must be a model returned by mct_fx (a GraphModule with quantizers)")
    names, customs = _metric_names(metrics)
    summary = summarize(qmodel)
    rows = {r.node: r for r in summary.layers}
    groups = _groups(rows)
    qview = measured_view(qmodel)  # a detector is compared at its NMS's inputs (boxes, scores)
    taps = _taps(qview, groups)
    first = next(iter_batches(loader, 1))
    args, kwargs = first
    example = args[0] if args and not kwargs else kwargs
    was_training = float_model.training
    float_model.eval()
    try:
        ref, reference = _reference(float_model, qmodel, example, taps)
    finally:
        float_model.train(was_training)
    ref = measured_view(ref)
    ref_taps = _taps(ref, groups)
    ref.eval()
    q_training = qmodel.training
    qmodel.eval()
    qview.eval()
    try:
        stats = {layer: _Stats() for layer in taps.values()}
        rep, out = _measure(ref, qview, taps, ref_taps, loader, n_batches, names, customs, stats)
        val, val_out = ({}, None) if validation is None else _measure(ref, qview, taps, ref_taps, validation,
                                                                       n_batches, names, customs, None)
    finally:
        qmodel.train(q_training)
    groups = {name: members for name, members in groups.items() if name in rep}
    inputs = _layer_inputs(qmodel, groups)
    layers = []
    for name, members in groups.items():
        group = [rows[m] for m in (*members, name)]
        weights = next((r.weights for r in group if r.weights != "-"), "-")
        layers.append(LayerComparison(name, "+".join(r.op for r in group), weights, rows[name].activation,
                                      rows[name].grid, rep[name], val.get(name) if validation is not None else None,
                                      stats[name].result(), inputs[name], members))
    order = tuple(groups)
    layers.sort(key=lambda r: _badness(r.metrics, names[0]), reverse=True)
    return Comparison(tuple(layers), out, val_out, names, reference, order)
