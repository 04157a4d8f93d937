"""Linear collapsing: weighted layers with nothing non-linear between them become one layer.

* conv (groups 1) -> 1x1 conv (stride 1, no padding, groups 1): ``W = W2 . W1`` over
  channels, ``b = W2 b1 + b2`` (exact for any stride, padding or dilation of the first);
* linear -> linear: ``W = W2 W1``, ``b = W2 b1 + b2``;
* conv / linear -> ``+ constant`` (a number or a per-channel tensor): the constant joins the bias.

A pair collapses only when the first layer's output feeds nothing else, both layers own
their parameters, and the collapsed kernel has no more parameters than the two it
replaces (a 1x1 144 -> 24 -> 144 bottleneck stays as it is).  One layer fewer is one
quantized activation fewer.  Runs on the functional form, after BN folding.
"""

from __future__ import annotations

import math
import operator

import torch
import torch.nn.functional as F
from torch import Tensor, fx

from mct_fx.graph_utils import attr_value, owned_param, set_layer_bias, set_param

__all__ = ["collapse_linear_layers"]

_CONVS = (F.conv1d, F.conv2d, F.conv3d)
_ADDS = (operator.add, torch.add)


def _owns_params(layer: fx.Node) -> bool:
    bias = layer.args[2] if len(layer.args) > 2 else None
    return owned_param(layer.args[1]) and (bias is None or owned_param(bias))


def _is_pointwise(layer: fx.Node, weight: Tensor) -> bool:
    """A 1x1 conv with stride 1, no padding and groups 1."""
    stride, padding, _, groups = layer.args[3:7]
    flat = lambda v: v if isinstance(v, (tuple, list)) else (v,)  # noqa: E731
    no_padding = isinstance(padding, str) or all(p == 0 for p in flat(padding))  # "same"/"valid" at 1x1
    return all(k == 1 for k in weight.shape[2:]) and all(s == 1 for s in flat(stride)) and no_padding and groups == 1


def _pair(second: fx.Node, gm: fx.GraphModule) -> fx.Node | None:
    """The layer ``second`` can absorb, or None."""
    first = second.args[0]
    if (not isinstance(first, fx.Node) or first.op != "call_function" or first.target not in _CONVS + (F.linear,)
            or first.kwargs or len(first.users) != 1):
        return None
    if not (_owns_params(first) and _owns_params(second)):
        return None
    w1, w2 = attr_value(gm, first.args[1]), attr_value(gm, second.args[1])
    if second.target is F.linear:
        ok = first.target is F.linear
    else:
        ok = first.target is second.target and first.args[6] == 1 and _is_pointwise(second, w2)
    if not ok:
        return None
    k = math.prod(w1.shape[2:])
    return first if w2.shape[0] * w1.shape[1] * k <= w1.numel() + w2.numel() else None


def _collapse_pair(gm: fx.GraphModule, first: fx.Node, second: fx.Node) -> None:
    w1, w2 = attr_value(gm, first.args[1]), attr_value(gm, second.args[1])
    b1, b2 = attr_value(gm, first.args[2]), attr_value(gm, second.args[2])
    m2 = w2.detach().double().reshape(w2.shape[0], w2.shape[1])
    w = torch.einsum("oc,ci...->oi...", m2, w1.detach().double())
    bias = None
    if b1 is not None:
        bias = m2 @ b1.detach().double()
    if b2 is not None:
        bias = b2.detach().double() if bias is None else bias + b2.detach().double()
    set_param(gm, second.args[1].target, w.to(w2.dtype), w2)
    if bias is not None:
        set_layer_bias(gm, second, bias)
    first_args = first.args
    second.args = (first_args[0], second.args[1], second.args[2]) + tuple(first_args[3:])
    _erase_layer(gm, first)


def _erase_layer(gm: fx.GraphModule, layer: fx.Node) -> None:
    params = [a for a in layer.args[1:3] if isinstance(a, fx.Node)]
    gm.graph.erase_node(layer)
    for p in params:
        if not p.users:
            gm.graph.erase_node(p)


def _channel_constant(add: fx.Node, layer: fx.Node, gm: fx.GraphModule) -> Tensor | None:
    """The per-output-channel vector ``add`` adds to ``layer``'s output, or None."""
    if add.op != "call_function" or add.target not in _ADDS or add.kwargs or len(add.args) != 2:
        return None
    other = add.args[1] if add.args[0] is layer else add.args[0]
    if other is layer:
        return None
    channels = attr_value(gm, layer.args[1]).shape[0]
    if isinstance(other, (int, float)) and not isinstance(other, bool):
        return torch.full((channels,), float(other), dtype=torch.float64)
    const = attr_value(gm, other)
    meta = layer.meta.get("tensor_meta")
    if const is None or meta is None or not const.is_floating_point():
        return None
    rank = len(meta.shape)
    shape = tuple(const.shape)
    if len(shape) > rank:
        return None
    shape = (1,) * (rank - len(shape)) + shape
    channel_dim = rank - 1 if layer.target is F.linear else 1
    if any(s != 1 for d, s in enumerate(shape) if d != channel_dim) or shape[channel_dim] not in (1, channels):
        return None
    return const.detach().double().reshape(-1).expand(channels)


def collapse_linear_layers(gm: fx.GraphModule) -> int:
    """Collapse every collapsible pair and every foldable constant add, in place; returns how many."""
    collapsed = 0
    changed = True
    while changed:
        changed = False
        for node in list(gm.graph.nodes):
            if node.op != "call_function" or node.target not in _CONVS + (F.linear,) or node.kwargs:
                continue
            first = _pair(node, gm)
            if first is not None:
                _collapse_pair(gm, first, node)
                collapsed, changed = collapsed + 1, True
                break
            if len(node.users) == 1 and _owns_params(node):
                add = next(iter(node.users))
                const = _channel_constant(add, node, gm)
                if const is not None:
                    bias = attr_value(gm, node.args[2])
                    base = bias.detach().double() if bias is not None else torch.zeros_like(const)
                    set_layer_bias(gm, node, base + const.to(base.device))
                    add.replace_all_uses_with(node)
                    gm.graph.erase_node(add)
                    collapsed, changed = collapsed + 1, True
                    break
    gm.graph.lint()
    gm.delete_all_unused_submodules()
    gm.recompile()
    return collapsed
