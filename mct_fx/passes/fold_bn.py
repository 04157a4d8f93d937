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

from mct_fx.graph_utils import groups_of

__all__ = ["fold_batchnorm"]

_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_CONV = (F.conv1d, F.conv2d, F.conv3d)
_CONV_T = (F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d)


def _param_node(node: object) -> bool:
    return isinstance(node, fx.Node) and node.op == "get_attr" and len(node.users) == 1


def _foldable(gm: fx.GraphModule, bn_node: fx.Node) -> bool:
    bn = gm.get_submodule(bn_node.target)
    layer = bn_node.args[0] if bn_node.args else None
    if not (bn.track_running_stats and bn.running_mean is not None and len(bn_node.args) == 1):
        return False
    if not isinstance(layer, fx.Node) or layer.op != "call_function" or len(layer.users) != 1:
        return False
    if layer.target not in _CONV + _CONV_T + (F.linear,) or layer.kwargs:
        return False
    if not _param_node(layer.args[1]) or (layer.args[2] is not None and not _param_node(layer.args[2])):
        return False
    if layer.target is F.linear:
        # BatchNorm1d normalises dim 1: only a 2-D linear output puts features there.
        meta = layer.meta.get("tensor_meta")
        return meta is not None and len(meta.shape) == 2
    return True


def _set_param(gm: fx.GraphModule, qualname: str, value: torch.Tensor, like: torch.Tensor | None) -> None:
    owner_name, _, attr = qualname.rpartition(".")
    owner = gm.get_submodule(owner_name)
    requires_grad = like.requires_grad if like is not None else True
    setattr(owner, attr, nn.Parameter(value, requires_grad=requires_grad))


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
        w = _fetch(gm, w_node.target)
        b = _fetch(gm, b_node.target) if b_node is not None else None
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
        _set_param(gm, w_node.target, new_w.to(w.dtype), w)
        if b_node is None:
            b_name = f"{w_node.target.rpartition('.')[0]}.bias" if w_node.target.endswith(".weight") else None
            if b_name is None or _exists(gm, b_name):
                b_name = f"{w_node.target}_folded_bias"
            _set_param(gm, b_name, new_b.to(w.dtype), w)
            with gm.graph.inserting_before(layer):
                b_node = gm.graph.get_attr(b_name)
            layer.update_arg(2, b_node)
        else:
            _set_param(gm, b_node.target, new_b.to(b.dtype), b)
        bn_node.replace_all_uses_with(layer)
        gm.graph.erase_node(bn_node)
        folded += 1
    gm.graph.lint()
    gm.delete_all_unused_submodules()
    gm.recompile()
    return folded


def _fetch(gm: fx.GraphModule, qualname: str) -> torch.Tensor:
    owner_name, _, attr = qualname.rpartition(".")
    return getattr(gm.get_submodule(owner_name), attr)


def _exists(gm: fx.GraphModule, qualname: str) -> bool:
    owner_name, _, attr = qualname.rpartition(".")
    return getattr(gm.get_submodule(owner_name), attr, None) is not None
