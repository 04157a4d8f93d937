"""Shared measurements: SQNR / energy ratios, batch accumulators, and recording node outputs while a graph runs.

Used by the comparison report, the troubleshooter and the exporters' agreement
checks; it sits below all of them so none imports another for a formula.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, fx
from torch.utils._pytree import tree_leaves

__all__ = ["format_value", "jsonable", "energy_ratio_db", "sqnr_db", "flat_outputs", "Accumulator", "Recorder",
           "run_recorded"]


def format_value(v: float) -> str:
    """A metric for a table: 4 significant digits, ``inf`` spelled out."""
    return "inf" if v == math.inf else f"{v:.4g}"


def jsonable(obj: Any) -> Any:
    """JSON has no infinity: +-inf become the strings "inf" / "-inf"."""
    if isinstance(obj, float) and math.isinf(obj):
        return "inf" if obj > 0 else "-inf"
    if isinstance(obj, dict):
        return {k: jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [jsonable(v) for v in obj]
    return obj


def energy_ratio_db(signal: float, noise: float) -> float:
    """``10 log10(signal / noise)``; infinite when there is no noise."""
    return math.inf if noise == 0 else 10 * math.log10(max(signal, 1e-300) / noise)


def sqnr_db(ref: Tensor, out: Tensor) -> float:
    """SQNR (dB) of ``out`` against ``ref``."""
    r = ref.float()
    return energy_ratio_db(float(r.square().sum()), float((out.float() - r).square().sum()))


def flat_outputs(output: Any) -> Tensor:
    """Every tensor of a model output as one ``[batch, values]`` matrix."""
    return torch.cat([t.reshape(t.shape[0] if t.dim() else 1, -1) for t in tree_leaves(output)
                      if isinstance(t, Tensor)], 1)


class Accumulator:
    """Sums over batches for one layer: signal and noise energy, cosine per sample, custom means."""

    def __init__(self, customs: dict[str, Callable]):
        self.signal = self.noise = self.cos_sum = 0.0  # become device tensors: no host sync per update
        self.count = self.samples = self.batches = 0
        self.custom = {name: 0.0 for name in customs}
        self.customs = customs

    def update(self, ref: Tensor, q: Tensor) -> None:
        r, qf = ref.detach().float(), q.detach().float()  # elementwise in float32, sums in float64
        rows_r = r.reshape(r.shape[0], -1) if r.dim() else r.reshape(1, 1)
        rows_q = qf.reshape(rows_r.shape)
        sq_r = rows_r.square().sum(1, dtype=torch.float64)
        sq_q = rows_q.square().sum(1, dtype=torch.float64)
        dot = (rows_r * rows_q).sum(1, dtype=torch.float64)
        self.signal = self.signal + sq_r.sum()
        self.noise = self.noise + (rows_q - rows_r).square().sum(dtype=torch.float64)
        self.count += r.numel()
        same = (rows_r == rows_q).all(1)  # zero vectors included: identical is cosine 1
        cos = torch.where(same, torch.ones_like(dot), dot / (sq_r * sq_q).sqrt().clamp_min(1e-300))
        self.cos_sum = self.cos_sum + cos.sum()
        self.samples += cos.numel()
        self.batches += 1
        for name, fn in self.customs.items():
            self.custom[name] += float(fn(ref, q))

    def result(self, names: Sequence[str]) -> dict[str, float]:
        out = {}
        for name in names:
            if name == "sqnr":
                out[name] = energy_ratio_db(float(self.signal), float(self.noise))
            elif name == "mse":
                out[name] = float(self.noise) / max(self.count, 1)
            elif name == "cosine":
                out[name] = float(self.cos_sum) / max(self.samples, 1)
            else:
                out[name] = self.custom[name] / max(self.batches, 1)
        return out


class Recorder(fx.Interpreter):
    """Runs a graph and hands the named nodes' outputs to ``sink(layer, tensor)`` as they appear."""

    def __init__(self, gm: fx.GraphModule, taps: dict[str, str], sink: Callable[[str, Tensor], None]):
        super().__init__(gm)
        self.taps, self.sink = taps, sink

    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        layer = self.taps.get(n.name)
        if layer is not None and isinstance(out, Tensor):
            self.sink(layer, out)
        return out


def run_recorded(gm: fx.GraphModule, taps: dict[str, str], inputs: Any, sink: Callable[[str, Tensor], None]) -> Any:
    """Run ``gm`` on ``inputs`` (``(args, kwargs)``) without gradients, handing tapped outputs to ``sink``."""
    args, kwargs = inputs
    if kwargs:
        placeholders = [n.target for n in gm.graph.nodes if n.op == "placeholder"]
        args = (*args, *(kwargs[p] for p in placeholders[len(args):] if p in kwargs))
    with torch.no_grad():
        return Recorder(gm, taps, sink).run(*args)
