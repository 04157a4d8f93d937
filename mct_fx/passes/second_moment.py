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

from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

from mct_fx.graph_utils import TRANSPOSED_CONVS, attr_value, param_source, set_layer_bias, set_param
from mct_fx.passes.layer_inputs import quantized_layers
from mct_fx.quantizers.modules import WeightQuantizer, quantizers_off

__all__ = ["correct_second_moments", "MAX_RATIO"]

MAX_RATIO = 2.0  # r stays within [1/2, 2]: a larger mismatch is not a statistics problem


class _OutputMoments(nn.Module):
    """Identity on a layer's input; accumulates per-channel moments of the layer's output
    computed with the float and with the quantized weight."""

    def __init__(self, layer: Callable, weight: Tensor, qweight: Tensor, bias: Tensor | None, rest: tuple,
                 channel_dim: int):
        super().__init__()
        self.layer, self.weight, self.qweight, self.bias, self.rest = layer, weight, qweight, bias, rest
        self.channel_dim = channel_dim
        self.sums: list[Tensor] | None = None  # [sum_f, sumsq_f, sum_q, sumsq_q]
        self.count = 0

    def forward(self, x: Tensor) -> Tensor:
        with torch.no_grad():
            outs = [self.layer(x, w, self.bias, *self.rest) for w in (self.weight, self.qweight)]
        dim = self.channel_dim % outs[0].dim()
        dims = [d for d in range(outs[0].dim()) if d != dim]
        yf, yq = (y.double() for y in outs)
        sums = [yf.sum(dims), (yf * yf).sum(dims), yq.sum(dims), (yq * yq).sum(dims)]
        self.sums = sums if self.sums is None else [a + b for a, b in zip(self.sums, sums, strict=True)]
        self.count += outs[0].numel() // outs[0].shape[dim]
        return x

    def moments(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Per channel: float mean and variance, quantized mean and variance."""
        n = self.count
        mf, mq = self.sums[0] / n, self.sums[2] / n
        vf, vq = (self.sums[1] / n - mf**2).clamp(min=0), (self.sums[3] / n - mq**2).clamp(min=0)
        return mf, vf, mq, vq


def correct_second_moments(gm: fx.GraphModule, batches: Iterable[tuple[tuple, dict]]) -> int:
    """Correct every eligible layer from ``batches`` of ``(args, kwargs)``; returns how many layers changed.

    Needs frozen weight quantizers and biases not yet bias-corrected."""
    probes: dict[fx.Node, tuple[fx.Node, WeightQuantizer, _OutputMoments, fx.Node]] = {}
    for layer, qnode, q in quantized_layers(gm):
        if layer.target in TRANSPOSED_CONVS or q.mode != "frozen" or q.axis != 0 or not q.affine:
            continue
        weight = attr_value(gm, qnode.args[0])
        bias_src = param_source(layer.args[2])
        bias = attr_value(gm, bias_src)
        with torch.no_grad():
            qweight = q(weight.detach())
        rest = tuple(layer.args[3:])
        obs = _OutputMoments(layer.target, weight.detach(), qweight, None if bias is None else bias.detach(), rest,
                             -1 if layer.target is F.linear else 1)
        name = f"{layer.name}_moments"
        gm.add_submodule(name, obs)
        with gm.graph.inserting_before(layer):
            probe = gm.graph.call_module(name, (layer.args[0],))
        probes[layer] = (qnode, q, obs, probe)
    if not probes:
        return 0
    gm.recompile()
    try:
        with quantizers_off(gm), torch.no_grad():
            for args, kwargs in batches:
                gm(*args, **kwargs)
    finally:
        for _, _, _, probe in probes.values():
            gm.graph.erase_node(probe)
            gm.delete_submodule(probe.target)
        gm.graph.lint()
        gm.recompile()
    corrected = 0
    for layer, (qnode, q, obs, _) in probes.items():
        if obs.sums is None:
            continue
        mf, vf, mq, vq = obs.moments()
        r = torch.where(vq > 0, torch.sqrt(vf / vq.clamp(min=1e-30)), torch.ones_like(vf))
        r = r.clamp(1 / MAX_RATIO, MAX_RATIO)
        weight = attr_value(gm, qnode.args[0])
        bias = attr_value(gm, param_source(layer.args[2]))
        b = bias.detach().double() if bias is not None else torch.zeros_like(r)
        shape = (-1,) + (1,) * (weight.dim() - 1)
        set_param(gm, qnode.args[0].target, weight.detach() * r.reshape(shape).to(weight.dtype), weight)
        q.scale = q.scale * r.to(q.scale.device, q.scale.dtype)
        set_layer_bias(gm, layer, r * (b - mq) + mf)
        bias_q = layer.args[2]
        if isinstance(bias_q, fx.Node) and bias_q.op == "call_module":
            module = gm.get_submodule(bias_q.target)
            if isinstance(module, WeightQuantizer) and module.mode == "frozen":
                module.freeze(attr_value(gm, param_source(bias_q)))
        corrected += 1
    return corrected
