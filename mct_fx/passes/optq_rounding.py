"""OPTQ rounding: every eligible kernel's rounding chosen with Hessian error feedback, in place.

After the grids are frozen (and mixed precision has chosen the bit widths), each
layer's weights are rounded on their grid by
:func:`~mct_fx.quantizers.optq.optq_round` (Frantar et al.'s GPTQ, called OPTQ
here to keep it apart from the gradient-based GPTQ of :mod:`mct_fx.gptq`) from the
second moment of the layer's inputs that an :class:`~mct_fx.passes.input_gram.InputGram`
gathered during calibration, and the on-grid weights are written into the
parameters.  Bias correction, when asked, follows from the same inputs' mean.
The float inputs are used: on the detection benchmark they gave the same mAP as
the quantized model's inputs (YOLO) or 0.7 points more (SSD), and they come with
the calibration pass instead of costing one more.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, fx

from mct_fx.config import QuantConfig
from mct_fx.graph_utils import attr_value
from mct_fx.passes.bias_correction import subtract_from_bias
from mct_fx.passes.input_gram import GRAM_LAYERS, InputGram
from mct_fx.passes.layer_inputs import quantized_layers
from mct_fx.quantizers.modules import WeightQuantizer
from mct_fx.quantizers.optq import optq_round

__all__ = ["OPTQReport", "optq_layers", "round_with_optq"]

log = logging.getLogger("mct_fx")


@dataclass(frozen=True)
class OPTQReport:
    """What OPTQ rounding did (in ``qmodel.meta["mct_fx.optq"]``)."""

    layers: tuple[str, ...]  # layers whose rounding OPTQ chose
    kept: tuple[str, ...]  # quantized layers left at the nearest rounding (a grid or layer kind OPTQ does not take)
    vectors: int  # input vectors behind a layer's second moment (the most any layer had)
    seconds: float  # the rounding (the gathering rides on calibration)

    def __str__(self) -> str:
        return (f"OPTQ: {len(self.layers)} layers rounded, {len(self.kept)} kept at the nearest rounding; "
                f"{self.vectors} input vectors per layer; {self.seconds:.1f} s")


def optq_layers(gm: fx.GraphModule) -> dict[str, torch.Size]:
    """``{layer: weight shape}`` of the layers OPTQ can round (which inputs to gather); the others are logged."""
    found = quantized_layers(gm)
    readers = Counter(qnode for _, qnode, _ in found)
    layers = {}
    for layer, qnode, q in found:
        weight = attr_value(gm, qnode.args[0])
        why = ("a look-up-table grid" if not q.affine
               else getattr(layer.target, "__name__", str(layer.target)) if layer.target not in GRAM_LAYERS
               else "a weight two layers read" if readers[qnode] > 1
               else "no weight tensor" if weight is None
               else f"a grid along axis {q.axis}" if q.axis not in (None, 0) else None)
        if why:
            log.info("OPTQ: %s keeps the nearest rounding (%s)", layer.name, why)
            continue
        layers[layer.name] = weight.shape
    return layers


@torch.no_grad()
def round_with_optq(gm: fx.GraphModule, inputs: dict[str, InputGram], config: QuantConfig) -> OPTQReport:
    """Round the kernels of the layers in ``inputs`` with ``config.optq`` on their frozen grids; with
    ``config.weights_bias_correction``, subtract the mean output shift left by the rounding from each bias
    (the layers OPTQ keeps, listed in the report, are the caller's to correct).

    Layers whose rows read as many inputs on the same integer range are rounded in
    one call, as groups of one batch (rows padded with zeros to the widest layer):
    the column sweep is sequential, so one sweep for many layers is what makes it fast.
    """
    start = time.perf_counter()
    settings = config.optq
    layers, kept = {}, []
    for layer, qnode, q in quantized_layers(gm):
        if layer.name in inputs and q.mode == "frozen" and q.affine and inputs[layer.name].count:
            layers[layer.name] = (attr_value(gm, qnode.args[0]), q, layer)
        else:
            kept.append(layer.name)
    buckets: dict[tuple[int, int, int], list[str]] = {}
    for name, (weight, q, _) in layers.items():
        buckets.setdefault((weight[0].numel(), q.qmin, q.qmax), []).append(name)
    for (_, qmin, qmax), names in buckets.items():
        parts = [_rows_and_grid(*layers[name][:2], inputs[name].groups) for name in names]
        width = max(rows.shape[1] for rows, _, _ in parts)
        padded = [[F.pad(t, (0, 0, 0, width - t.shape[1]), value=fill)
                   for t, fill in zip(part, (0.0, 1.0, 0.0), strict=True)] for part in parts]
        rows, scale, zero_point = (torch.cat(ts) for ts in zip(*padded, strict=True))
        gram = torch.cat([inputs[name].second_moment() for name in names])
        rounded = optq_round(rows, gram, scale, zero_point, qmin, qmax, damp=settings.damp,
                             block_size=settings.block_size, act_order=settings.act_order)
        for name, part, out in zip(names, parts, rounded.split([p[0].shape[0] for p in parts]), strict=True):
            weight, _, layer = layers[name]
            out = out[:, :part[0].shape[1]]
            if config.weights_bias_correction:
                shift = ((out - part[0]) * inputs[name].mean()[:, None, :]).sum(2).reshape(-1)
                subtract_from_bias(gm, layer, shift, config.weights_error_method, config.lp_norm)
            weight.copy_(out.reshape(weight.shape).to(weight.dtype))
    vectors = max((inputs[name].count for name in layers), default=0)
    return OPTQReport(tuple(layers), tuple(kept), vectors, time.perf_counter() - start)


def _rows_and_grid(weight: Tensor, quantizer: WeightQuantizer, groups: int) -> tuple[Tensor, Tensor, Tensor]:
    """The weight as ``[G, O/G, D]`` rows and its scale and zero point per row (``[G, O/G, 1]``)."""
    rows = weight.detach().float().reshape(groups, weight.shape[0] // groups, -1)
    shape = (groups, rows.shape[1], 1)
    grid = (groups, -1, 1) if quantizer.axis is not None and quantizer.scale.numel() > 1 else (1, 1, 1)
    return rows, quantizer.scale.float().reshape(grid).expand(shape), quantizer.zero_point.float().reshape(
        grid).expand(shape)
