"""Sensitivity of a quantized GraphModule to each node's candidate bit-widths.

The distance of a model from the float one is measured at interest points (the
quantized outputs of the Conv/Linear layers and their fused groups, normalized
MSE) and at the model's outputs (KL divergence after a softmax, cosine distance
after an L2 normalization, normalized MSE otherwise).  Interest points are
aggregated per :class:`DistanceWeighting` and added to the mean output distance.

The evaluator runs one copy of the graph that also returns the interest
points, sharing the quantizer modules, so a candidate is measured by swapping
its frozen quantizers in and running the sample images once: one forward pass
per batch per candidate, no re-quantization.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, fx

from mct_fx.data import ModelInputs
from mct_fx.mixed_precision.config import DistanceWeighting, OutputDistance
from mct_fx.passes.insert_quantizers import QUANTIZED_FROM
from mct_fx.quantizers.modules import quantizers_off
from mct_fx.tpc.matching import annotation
from mct_fx.tpc.vocabulary import LINEAR_OPS

__all__ = ["SensitivityEvaluator", "interest_points"]

_EPS = 1e-12


EXP_SIGMA = 0.1


def interest_points(gm: fx.GraphModule) -> list[fx.Node]:
    """Activation-quantizer nodes at the outputs of Conv/Linear layers (or of fused groups holding one)."""
    with_layer = {annotation(n).fused_into or n.name for n in gm.graph.nodes
                  if annotation(n) is not None and annotation(n).op in LINEAR_OPS}
    return [n for n in gm.graph.nodes if n.op == "call_module" and n.target.endswith("_act_quant")
            and n.meta.get(QUANTIZED_FROM) in with_layer]


def _storage_op(node: object) -> str | None:
    """Operator set of the node that computed an output value (looking through quantizers and views)."""
    while isinstance(node, fx.Node):
        ann = annotation(node)
        if ann is None and node.op == "call_module" and node.args:
            node = node.args[0]
        elif ann is not None and ann.op in ("Reshape", "Flatten", "Squeeze", "Identity", "Dropout", "Cast"):
            node = node.args[0]
        else:
            return ann.op if ann is not None else None
    return None


def _flatten_outputs(value: object) -> list:
    if isinstance(value, (tuple, list)):
        return [v for item in value for v in _flatten_outputs(item)]
    if isinstance(value, dict):
        return [v for item in value.values() for v in _flatten_outputs(item)]
    return [value]


def _per_image(t: Tensor, fn: Callable[[Tensor, Tensor], Tensor], ref: Tensor) -> Tensor:
    if t.dim() == 0:
        t, ref = t.reshape(1, 1), ref.reshape(1, 1)
    return fn(t.float().flatten(1), ref.float().flatten(1))


def _nmse(q: Tensor, f: Tensor) -> Tensor:
    return (q - f).pow(2).sum(1) / (f.pow(2).sum(1) + _EPS)


def _cosine(q: Tensor, f: Tensor) -> Tensor:
    return 1 - torch.nn.functional.cosine_similarity(q, f, dim=1, eps=1e-8)


def _kl(q: Tensor, f: Tensor) -> Tensor:
    p, r = f.clamp_min(1e-8), q.clamp_min(1e-8)
    return (p * (p / r).log()).sum(1)


_DISTANCES = {OutputDistance.MSE: _nmse, OutputDistance.KL: _kl, OutputDistance.COSINE: _cosine}


class SensitivityEvaluator:
    """Distance of ``gm`` (with whatever quantizers it holds now) from its float self, on fixed images."""

    def __init__(self, gm: fx.GraphModule, images: Sequence[ModelInputs],
                 weighting: DistanceWeighting = DistanceWeighting.AVG,
                 output_distance: OutputDistance = OutputDistance.AUTO,
                 hessian_weights: dict[str, float] | None = None):
        self.gm = gm
        self.images = list(images)
        self.weighting = DistanceWeighting(weighting)
        self.points = interest_points(gm)
        graph = fx.Graph()
        values: dict[fx.Node, fx.Node] = {}
        out = graph.graph_copy(gm.graph, values)
        outputs = _flatten_outputs(out)
        self.n_outputs = len(outputs)
        graph.output((*outputs, *[values[p] for p in self.points]))
        self.probe = fx.GraphModule(gm, graph)  # shares gm's submodules: swapping them is seen here
        original_outputs = _flatten_outputs(next(n for n in gm.graph.nodes if n.op == "output").args[0])
        kind = OutputDistance(output_distance)
        self.output_fns = [_DISTANCES[kind if kind is not OutputDistance.AUTO else _auto_kind(o)]
                           for o in original_outputs]
        if self.weighting is DistanceWeighting.HESSIAN:
            if hessian_weights is None:
                raise ValueError("Hessian distance weighting needs the interest points' Hessian traces")
            self.point_weights = torch.tensor([hessian_weights[p.name] for p in self.points])
        self.reference = self._run(float_mode=True)

    def _run(self, float_mode: bool = False) -> list[list[Tensor]]:
        with torch.no_grad(), quantizers_off(self.probe) if float_mode else contextlib.nullcontext():
            return [list(self.probe(*args, **kwargs)) for args, kwargs in self.images]

    def distance(self) -> float:
        """The aggregated distance of the model as its quantizers are now."""
        outs, points = [], [[] for _ in self.points]
        for got, ref in zip(self._run(), self.reference, strict=True):
            for i, fn in enumerate(self.output_fns):
                if isinstance(got[i], Tensor) and got[i].is_floating_point():
                    outs.append(_per_image(got[i], fn, ref[i]).mean())
            for j in range(len(self.points)):
                k = self.n_outputs + j
                points[j].append(_per_image(got[k], _nmse, ref[k]))
        output_term = float(torch.stack(outs).mean()) if outs else 0.0
        if not self.points or self.weighting is DistanceWeighting.LAST_LAYER:
            return output_term
        per_point = torch.stack([torch.cat(p).mean() for p in points])
        if self.weighting is DistanceWeighting.AVG:
            weights = torch.ones_like(per_point)
        elif self.weighting is DistanceWeighting.EXP:
            weights = 1 - torch.exp(-per_point / EXP_SIGMA)
        else:
            weights = self.point_weights.to(per_point)
        total = float(weights.sum())
        point_term = float((weights * per_point).sum() / total) if total > 0 and math.isfinite(total) else 0.0
        return point_term + output_term


def _auto_kind(value: object) -> OutputDistance:
    op = _storage_op(value)
    if op in ("Softmax",):
        return OutputDistance.KL
    if op == "L2Norm":
        return OutputDistance.COSINE
    return OutputDistance.MSE
