"""Residual collapsing: ``conv(x) + x`` becomes one conv whose kernel holds the identity.

When a conv keeps the shape of its input (same channels, stride 1, dilation 1, odd
kernel, zero padding of half the kernel), adding its input back is adding 1 at the
centre tap of each channel's own filter.  The add and its quantized output disappear.
Grouped and depthwise convs qualify too (the identity stays inside each group).
Runs on the functional form, after BN folding.
"""

from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from torch import fx

from mct_fx.graph_utils import attr_value, owned_param, set_param

__all__ = ["collapse_residuals"]

_CONVS = (F.conv1d, F.conv2d, F.conv3d)
_ADDS = (operator.add, torch.add)


def _as_tuple(v: object, n: int) -> tuple:
    return tuple(v) if isinstance(v, (tuple, list)) else (v,) * n


def _keeps_shape(conv: fx.Node, weight: torch.Tensor) -> bool:
    stride, padding, dilation, groups = conv.args[3:7]
    kernel = tuple(weight.shape[2:])
    n = len(kernel)
    if isinstance(padding, str):
        padding = tuple(k // 2 for k in kernel) if padding == "same" else (0,) * n
    return (weight.shape[0] == weight.shape[1] * groups and all(k % 2 == 1 for k in kernel)
            and all(s == 1 for s in _as_tuple(stride, n)) and all(d == 1 for d in _as_tuple(dilation, n))
            and _as_tuple(padding, n) == tuple(k // 2 for k in kernel))


def _residual_conv(add: fx.Node, gm: fx.GraphModule) -> fx.Node | None:
    if add.op != "call_function" or add.target not in _ADDS or add.kwargs or len(add.args) != 2:
        return None
    for conv, other in (add.args, add.args[::-1]):
        if (isinstance(conv, fx.Node) and conv.op == "call_function" and conv.target in _CONVS
                and not conv.kwargs and len(conv.users) == 1 and conv.args[0] is other
                and owned_param(conv.args[1]) and _keeps_shape(conv, attr_value(gm, conv.args[1]))):
            return conv
    return None


def collapse_residuals(gm: fx.GraphModule) -> int:
    """Fold every ``conv(x) + x`` into the conv's kernel, in place; returns how many."""
    collapsed = 0
    for add in list(gm.graph.nodes):
        conv = _residual_conv(add, gm)
        if conv is None:
            continue
        w = attr_value(gm, conv.args[1])
        new = w.detach().clone()
        channels = torch.arange(w.shape[0], device=w.device)
        centre = tuple(k // 2 for k in w.shape[2:])
        new[(channels, channels % w.shape[1]) + centre] += 1.0  # each channel's own tap (inside its group)
        set_param(gm, conv.args[1].target, new, w)
        add.replace_all_uses_with(conv)
        gm.graph.erase_node(add)
        collapsed += 1
    gm.graph.lint()
    gm.recompile()
    return collapsed
