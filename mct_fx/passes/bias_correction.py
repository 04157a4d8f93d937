"""Weights bias correction: cancel the mean output shift that weight quantization causes.

For a layer ``y = W x + b`` with quantized weights ``Wq``, the expected output
moves by ``(Wq - W) E[x]``; subtracting it from the bias removes that shift.
``E[x]`` per input channel comes from the ``InputMeans`` observers that
calibration fills (see :mod:`mct_fx.passes.layer_inputs`).  Grouped, depthwise
and transposed convolutions are handled; zero padding at borders is ignored.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, fx

from mct_fx.graph_utils import TRANSPOSED_CONVS, attr_value, groups_of, set_layer_bias
from mct_fx.passes.layer_inputs import expand_to_weight, quantized_layers
from mct_fx.quantizers.modules import WeightQuantizer
from mct_fx.quantizers.search import ErrorMethod

__all__ = ["add_missing_biases", "correct_biases", "output_shift", "subtract_from_bias"]


def add_missing_biases(gm: fx.GraphModule) -> fx.GraphModule:
    """Give every layer with a quantized kernel a bias parameter (zeros) so correction has a place to go.

    Part of preparation, so a prepared model has the same ``state_dict`` keys as a corrected one.
    """
    for layer, qnode, _ in quantized_layers(gm):
        if len(layer.args) > 2 and layer.args[2] is not None:
            continue
        weight = attr_value(gm, qnode.args[0])
        channels = weight.shape[1] * groups_of(layer) if layer.target in TRANSPOSED_CONVS else weight.shape[0]
        set_layer_bias(gm, layer, torch.zeros(channels, dtype=weight.dtype, device=weight.device))
    gm.graph.lint()
    gm.recompile()
    return gm


def output_shift(layer: fx.Node, delta: Tensor, mean: Tensor) -> Tensor:
    """Expected output shift per output channel of ``layer`` for weight error ``delta``."""
    weighted = delta * expand_to_weight(layer, mean, delta).to(delta.dtype)
    if layer.target is F.linear:
        return weighted.sum(1)
    if layer.target not in TRANSPOSED_CONVS:
        return weighted.sum(tuple(range(1, delta.dim())))
    # transposed conv: weight [in, out/groups, k...]; each output sees ~prod(k)/prod(stride) taps, not prod(k)
    groups = groups_of(layer)
    per_in_out = weighted.sum(tuple(range(2, delta.dim())))
    shift = per_in_out.reshape(groups, -1, per_in_out.shape[1]).sum(1).reshape(-1)
    stride = layer.args[3] if len(layer.args) > 3 else 1
    strides = (stride,) * (delta.dim() - 2) if isinstance(stride, int) else tuple(stride)
    return shift / math.prod(strides)


def correct_biases(gm: fx.GraphModule, input_means: dict[str, Tensor],
                   error: ErrorMethod = ErrorMethod.MSE, p: float = 2.0) -> fx.GraphModule:
    """Subtract each layer's expected output shift from its bias.

    ``input_means``: per-input-channel mean of each layer's input, by layer name
    (from :class:`InputMeans` observers).  Needs frozen weight quantizers;
    re-freezes a bias quantizer whose bias changed.
    """
    for layer, qnode, q in quantized_layers(gm):
        mean = input_means.get(layer.name)
        if mean is None or q.mode != "frozen":
            continue
        weight = attr_value(gm, qnode.args[0])
        with torch.no_grad():
            delta = (q(weight) - weight).double()
            subtract_from_bias(gm, layer, output_shift(layer, delta, mean.double()), error, p)
    return gm


def subtract_from_bias(gm: fx.GraphModule, layer: fx.Node, shift: Tensor, error: ErrorMethod = ErrorMethod.MSE,
                       p: float = 2.0) -> bool:
    """``bias -= shift`` for ``layer`` (no bias: nothing, returns False); a frozen bias quantizer is frozen
    again on the new bias, so the corrected bias is not clipped to the old grid."""
    bias_src = layer.args[2] if len(layer.args) > 2 else None
    bias_quant = None
    if isinstance(bias_src, fx.Node) and bias_src.op == "call_module":
        bias_quant, bias_src = gm.get_submodule(bias_src.target), bias_src.args[0]
    bias = attr_value(gm, bias_src)
    if bias is None:
        return False
    with torch.no_grad():
        bias -= shift.to(bias.device, bias.dtype)
    if isinstance(bias_quant, WeightQuantizer) and bias_quant.mode == "frozen":
        bias_quant.freeze(bias, error, p)
    return True
