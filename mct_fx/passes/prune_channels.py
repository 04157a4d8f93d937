"""Remove channels from a functionalized GraphModule: every tensor that holds them gets physically smaller.

For each section (see :mod:`mct_fx.channel_sections`) the kept channels are
given; entries lose output channels (weight rows and bias), channel-wise layers
(BatchNorm, PReLU, depthwise / grouped convs) lose those channels, and exits
lose the matching input channels.  What a removed channel fed an exit on
average is added to the exit's bias (or taken from the running mean of the
BatchNorm right after it), so the exit's output keeps its mean; an exit with
neither is not compensated (a new bias would outgrow the memory budget).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, fx, nn

from mct_fx.channel_sections import ChannelSections, keep_index, weight_axes
from mct_fx.graph_utils import attr_value, groups_of, set_param

__all__ = ["prune_channels"]


def prune_channels(gm: fx.GraphModule, sections: ChannelSections, keep: dict[int, Tensor],
                   input_means: dict[str, Tensor] | None = None) -> fx.GraphModule:
    """Keep only the channels ``keep[section]`` (sorted indices) of each section in ``keep``.

    ``input_means``: per exit layer, the mean of each input feature over calibration data (the
    compensation of removed channels; exits without one are not compensated).  Returns ``gm``.
    """
    nodes = {n.name: n for n in gm.graph.nodes}
    input_means = input_means or {}
    for name, section in sections.entries.items():
        if section in keep:
            _select(gm, nodes[name], weight_axes(nodes[name])[0], keep[section], with_bias=True)
    for name, segs in sections.params.items():
        idx = keep_index(segs, keep)
        node = nodes[name]
        if node.op == "call_module":
            _prune_module(gm.get_submodule(node.target), idx)
        else:  # a grouped conv: whole groups go, its groups argument follows
            per_group = attr_value(gm, node.args[1]).shape[1]
            _select(gm, node, 0, idx, with_bias=True)
            node.update_arg(6, len(idx) // per_group)
    for name, segs in sections.exits.items():
        idx = keep_index(segs, keep)
        node = nodes[name]
        in_axis = weight_axes(node)[1]
        weight = attr_value(gm, node.args[1])
        if len(idx) == weight.shape[in_axis]:
            continue
        if name in input_means:
            _compensate(gm, node, idx, input_means[name])
        _select(gm, node, in_axis, idx, with_bias=False)
    for name in {*sections.entries, *sections.exits, *sections.params}:
        if nodes[name].op == "call_function":
            _sync_holder(gm, nodes[name])
    gm.graph.lint()
    gm.recompile()
    return gm


def _select(gm: fx.GraphModule, layer: fx.Node, axis: int, idx: Tensor, with_bias: bool) -> None:
    """Keep ``idx`` along ``axis`` of the layer's weight (and of its bias, the output axis)."""
    w_node = layer.args[1]
    weight = attr_value(gm, w_node)
    set_param(gm, w_node.target, weight.detach().index_select(axis, idx.to(weight.device)).clone(), weight)
    bias_node = layer.args[2] if len(layer.args) > 2 else None
    if with_bias and bias_node is not None:
        bias = attr_value(gm, bias_node)
        set_param(gm, bias_node.target, bias.detach()[idx.to(bias.device)].clone(), bias)


def _prune_module(module: nn.Module, idx: Tensor) -> None:
    """Keep channels ``idx`` of a BatchNorm or PReLU module (parameters and running statistics)."""
    for attr in ("weight", "bias", "running_mean", "running_var"):
        value = getattr(module, attr, None)
        if value is None:
            continue
        kept = value.detach()[idx.to(value.device)].clone()
        setattr(module, attr, nn.Parameter(kept, value.requires_grad) if isinstance(value, nn.Parameter) else kept)
    if hasattr(module, "num_features"):
        module.num_features = len(idx)
    if hasattr(module, "num_parameters"):
        module.num_parameters = len(idx)


def _compensate(gm: fx.GraphModule, layer: fx.Node, idx: Tensor, mean: Tensor) -> None:
    """Add to the layer's output what its removed inputs contributed on average."""
    weight = attr_value(gm, layer.args[1]).detach()
    in_axis = weight_axes(layer)[1]
    removed = torch.ones(weight.shape[in_axis], dtype=torch.bool)
    removed[idx] = False
    w = weight.index_select(in_axis, removed.nonzero().flatten().to(weight.device))
    m = mean.to(w)[removed.to(w.device)]
    if in_axis == 1:  # conv / linear: [out, in, *kernel]
        delta = torch.einsum("oi...,i->o", w, m)
    else:  # transposed conv [in, out, *kernel]: each output pixel sees kernel / stride taps on average
        delta = torch.einsum("io...,i->o", w, m) / math.prod(_tuple(layer.args[3]))
    bias_node = layer.args[2] if len(layer.args) > 2 else None
    if bias_node is not None:
        bias = attr_value(gm, bias_node)
        set_param(gm, bias_node.target, (bias.detach() + delta.to(bias)).clone(), bias)
        return
    users = list(layer.users)
    bn = gm.get_submodule(users[0].target) if len(users) == 1 and users[0].op == "call_module" else None
    if isinstance(bn, nn.modules.batchnorm._BatchNorm) and bn.running_mean is not None:
        bn.running_mean -= delta.to(bn.running_mean)
    # else: no bias to carry it; adding one would grow the model past the budget it was pruned to


def _sync_holder(gm: fx.GraphModule, layer: fx.Node) -> None:
    """Make the module holding a layer's weight describe its new shape (so its repr does not lie)."""
    w_node = layer.args[1]
    owner = gm.get_submodule(w_node.target.rpartition(".")[0])
    weight = attr_value(gm, w_node)
    if isinstance(owner, nn.Linear):
        owner.out_features, owner.in_features = weight.shape[0], weight.shape[1]
    elif isinstance(owner, nn.modules.conv._ConvNd):
        groups = groups_of(layer)
        owner.groups = groups
        if owner.transposed:
            owner.in_channels, owner.out_channels = weight.shape[0], weight.shape[1] * groups
        else:
            owner.out_channels, owner.in_channels = weight.shape[0], weight.shape[1] * groups


def _tuple(v: object) -> tuple:
    return tuple(v) if isinstance(v, (tuple, list)) else (v,)
