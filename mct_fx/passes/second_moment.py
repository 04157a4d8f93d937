"""Second-moment correction: give each layer's output, with quantized weights, the float per-channel mean and variance.

Weight quantization changes the spread of a layer's output as well as its mean;
with BN folded into the kernel, that is the BN statistics no longer matching
(the BN re-estimation of MCT's ``weights_second_moment_correction``).  On a few
calibration batches, with every quantizer off except in the probe, each layer
``y = W x + b`` is evaluated with float and with quantized weights on the same
inputs; output channel ``c`` then gets ``r_c = std_float / std_quant``:

    W <- r W  (and the weight grid's scale <- r scale: the same integer codes)
    b <- r (b - mean_quant) + mean_float

so the corrected layer has the float layer's per-channel mean and variance.  The
mean part is bias correction measured directly, so this replaces
:func:`~mct_fx.passes.bias_correction.correct_biases` (run instead of it, on the
original biases).  Layers with per-output-channel kernel grids (conv, linear)
are corrected; transposed convs and per-tensor grids are left as they are.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

from mct_fx.graph_utils import TRANSPOSED_CONVS, attr_value, layer_bias, param_source, set_layer_bias, set_param
from mct_fx.passes.layer_inputs import quantized_layers
from mct_fx.quantizers.modules import WeightQuantizer, quantizers_off

__all__ = ["correct_second_moments", "correctable_layers", "output_moments", "moment_fix", "MAX_RATIO"]

MAX_RATIO = 2.0  # r stays within [1/2, 2]: a larger mismatch is not a statistics problem


class _OutputMoments(nn.Module):
    """Identity on a layer's input; accumulates per-channel moments of the layer's output computed with
    each of ``weights`` (the float weight and quantized versions of it)."""

    def __init__(self, layer: Callable, weights: Sequence[Tensor], bias: Tensor | None, rest: tuple,
                 channel_dim: int):
        super().__init__()
        self.layer, self.weights, self.bias, self.rest = layer, list(weights), bias, rest
        self.channel_dim = channel_dim
        self.sums: list[Tensor] | None = None  # [sum, sum of squares], each (weights, channels)
        self.count = 0

    def forward(self, x: Tensor) -> Tensor:
        with torch.no_grad():
            outs = [self.layer(x, w, self.bias, *self.rest).double() for w in self.weights]
        dim = self.channel_dim % outs[0].dim()
        dims = [d for d in range(outs[0].dim()) if d != dim]
        sums = [torch.stack([y.sum(dims) for y in outs]), torch.stack([(y * y).sum(dims) for y in outs])]
        self.sums = sums if self.sums is None else [a + b for a, b in zip(self.sums, sums, strict=True)]
        self.count += outs[0].numel() // outs[0].shape[dim]
        return x

    def moments(self) -> tuple[Tensor, Tensor]:
        """Per weight and channel: output mean and variance."""
        mean = self.sums[0] / self.count
        return mean, (self.sums[1] / self.count - mean**2).clamp(min=0)


def correctable_layers(gm: fx.GraphModule) -> list[tuple[fx.Node, fx.Node, WeightQuantizer]]:
    """``(layer, weight-quantizer node, quantizer)`` of the layers this correction applies to."""
    return [(layer, qnode, q) for layer, qnode, q in quantized_layers(gm)
            if layer.target not in TRANSPOSED_CONVS and q.mode == "frozen" and q.axis == 0 and q.affine]


def output_moments(gm: fx.GraphModule, weights: dict[fx.Node, Sequence[Tensor]],
                   batches: Iterable[tuple[tuple, dict]]) -> dict[fx.Node, tuple[Tensor, Tensor]]:
    """Per layer, the per-channel mean and variance of its output with each of its ``weights`` (stacked), on
    the float model's layer inputs (every quantizer off) over ``batches`` of ``(args, kwargs)``."""
    probes: dict[fx.Node, tuple[_OutputMoments, fx.Node]] = {}
    for layer, ws in weights.items():
        bias = layer_bias(gm, layer)
        obs = _OutputMoments(layer.target, ws, None if bias is None else bias.detach(), tuple(layer.args[3:]),
                             -1 if layer.target is F.linear else 1)
        name = f"{layer.name}_moments"
        gm.add_submodule(name, obs)
        with gm.graph.inserting_before(layer):
            probes[layer] = (obs, gm.graph.call_module(name, (layer.args[0],)))
    if not probes:
        return {}
    gm.recompile()
    try:
        with quantizers_off(gm), torch.no_grad():
            for args, kwargs in batches:
                gm(*args, **kwargs)
    finally:
        for _, probe in probes.values():
            gm.graph.erase_node(probe)
            gm.delete_submodule(probe.target)
        gm.graph.lint()
        gm.recompile()
    return {layer: obs.moments() for layer, (obs, _) in probes.items() if obs.sums is not None}


def moment_fix(mean_f: Tensor, var_f: Tensor, mean_q: Tensor, var_q: Tensor,
               bias: Tensor | None) -> tuple[Tensor, Tensor]:
    """``(r, new bias)`` giving a layer with output moments ``mean_q, var_q`` the moments ``mean_f, var_f``."""
    r = torch.where(var_q > 0, torch.sqrt(var_f / var_q.clamp(min=1e-30)), torch.ones_like(var_f))
    r = r.clamp(1 / MAX_RATIO, MAX_RATIO)
    b = bias.detach().double() if bias is not None else torch.zeros_like(r)
    return r, r * (b - mean_q) + mean_f


def correct_second_moments(gm: fx.GraphModule, batches: Iterable[tuple[tuple, dict]]) -> int:
    """Correct every eligible layer from ``batches`` of ``(args, kwargs)``; returns how many layers changed.

    Needs frozen weight quantizers and biases not yet bias-corrected."""
    layers = {layer: (qnode, q) for layer, qnode, q in correctable_layers(gm)}
    weights = {}
    with torch.no_grad():
        for layer, (qnode, q) in layers.items():
            weight = attr_value(gm, qnode.args[0]).detach()
            weights[layer] = (weight, q(weight))
    moments = output_moments(gm, weights, batches)
    for layer, (mean, var) in moments.items():
        qnode, q = layers[layer]
        weight = attr_value(gm, qnode.args[0])
        bias = layer_bias(gm, layer)
        r, new_bias = moment_fix(mean[0], var[0], mean[1], var[1], bias)
        shape = (-1,) + (1,) * (weight.dim() - 1)
        set_param(gm, qnode.args[0].target, weight.detach() * r.reshape(shape).to(weight.dtype), weight)
        q.scale = q.scale * r.to(q.scale.device, q.scale.dtype)
        set_layer_bias(gm, layer, new_bias)
        bias_q = layer.args[2]
        if isinstance(bias_q, fx.Node) and bias_q.op == "call_module":
            module = gm.get_submodule(bias_q.target)
            if isinstance(module, WeightQuantizer) and module.mode == "frozen":
                module.freeze(attr_value(gm, param_source(bias_q)))
    return len(moments)
