"""Fold BatchNorm into the preceding Conv / ConvTranspose / Linear.

Works on the functional form (run :func:`functionalize_layers` first).  A BN
folds when its input is a weighted layer used only by that BN, the layer's
weight and bias are parameters used only by that layer, and the BN uses running
statistics.  Any other BN stays in the graph as an op of its own.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import fx, nn

from mct_fx.graph_utils import attr_value, groups_of, owned_param, set_layer_bias, set_param

__all__ = ["fold_batchnorm"]

_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_CONV = (F.conv1d, F.conv2d, F.conv3d)
_CONV_T = (F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d)


def _foldable(gm: fx.GraphModule, bn_node: fx.Node) -> bool:
    bn = gm.get_submodule(bn_node.target)
    layer = bn_node.args[0] if bn_node.args else None
    if not (bn.track_running_stats and bn.running_mean is not None and len(bn_node.args) == 1):
        return False
    if not isinstance(layer, fx.Node) or layer.op != "call_function" or len(layer.users) != 1:
        return False
    if layer.target not in _CONV + _CONV_T + (F.linear,) or layer.kwargs:
        return False
    if not owned_param(layer.args[1]) or (layer.args[2] is not None and not owned_param(layer.args[2])):
        return False
    if layer.target is F.linear:
        # BatchNorm1d normalises dim 1: only a 2-D linear output puts features there.
        meta = layer.meta.get("tensor_meta")
        return meta is not None and len(meta.shape) == 2
    return True


def fold_batchnorm(gm: fx.GraphModule) -> int:
    """Fold every foldable BN in place; returns how many were folded."""
    folded = 0
    for bn_node in list(gm.graph.nodes):
        if bn_node.op != "call_module" or type(gm.get_submodule(bn_node.target)) not in _BN:
            continue
        if not _foldable(gm, bn_node):
            continue
        bn = gm.get_submodule(bn_node.target)
        layer = bn_node.args[0]
        w_node, b_node = layer.args[1], layer.args[2]
        w, b = attr_value(gm, w_node), attr_value(gm, b_node)
        std = torch.sqrt(bn.running_var.double() + bn.eps)
        gamma = bn.weight.double() if bn.weight is not None else torch.ones_like(std)
        beta = bn.bias.double() if bn.bias is not None else torch.zeros_like(std)
        factor = gamma / std
        w64 = w.detach().double()
        if layer.target in _CONV_T:
            # weight [in, out/groups, k...]; output channel o = g * out/groups + j
            groups = groups_of(layer)
            shape = (groups, 1, w.shape[1]) + (1,) * (w.dim() - 2)
            new_w = (w64.reshape((groups, w.shape[0] // groups) + tuple(w.shape[1:]))
                     * factor.reshape(shape)).reshape(w.shape)
        else:
            new_w = w64 * factor.reshape((-1,) + (1,) * (w.dim() - 1))
        b64 = b.detach().double() if b is not None else torch.zeros_like(std)
        new_b = (b64 - bn.running_mean.double()) * factor + beta
        set_param(gm, w_node.target, new_w.to(w.dtype), w)
        set_layer_bias(gm, layer, new_b)
        bn_node.replace_all_uses_with(layer)
        gm.graph.erase_node(bn_node)
        folded += 1
    gm.graph.lint()
    gm.delete_all_unused_submodules()
    gm.recompile()
    return folded

