"""Per-channel statistics of the inputs of weighted layers, gathered during calibration.

:func:`observe_layer_inputs` puts an identity observer in front of every layer
whose kernel is quantized, so the calibration pass records the mean of each
input channel with no extra pass over the data (bias correction uses it);
:func:`remove_observers` takes them out again.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

from mct_fx.graph_utils import TRANSPOSED_CONVS, groups_of, quantizer_nodes
from mct_fx.quantizers.modules import WeightQuantizer

__all__ = ["InputMeans", "quantized_layers", "observe_layer_inputs", "insert_observer", "remove_observers",
           "expand_to_weight"]


class InputMeans(nn.Module):
    """Identity that accumulates the per-channel sum of what flows through it (no ``state_dict`` entries)."""

    def __init__(self, channel_dim: int):
        super().__init__()
        self.channel_dim = channel_dim
        self.sum: Tensor | None = None
        self.count = 0

    def forward(self, x: Tensor) -> Tensor:
        dim = self.channel_dim % x.dim()
        s = x.detach().float().sum([d for d in range(x.dim()) if d != dim])
        if self.sum is not None and self.sum.shape != s.shape:
            return x  # a batch the layer cannot take: let the layer itself raise
        self.sum = s if self.sum is None else self.sum + s
        self.count += x.numel() // max(1, x.shape[dim])
        return x

    def mean(self) -> Tensor:
        if self.sum is None:
            raise RuntimeError("no data observed")
        return self.sum / self.count


def quantized_layers(gm: fx.GraphModule) -> list[tuple[fx.Node, fx.Node, WeightQuantizer]]:
    """``(layer, weight-quantizer node, quantizer)`` of every layer whose kernel is quantized."""
    out = []
    for qnode, q in quantizer_nodes(gm, WeightQuantizer):
        for layer in qnode.users:
            if layer.op == "call_function" and len(layer.args) > 1 and layer.args[1] is qnode:
                out.append((layer, qnode, q))
    return out


def observe_layer_inputs(gm: fx.GraphModule) -> dict[str, InputMeans]:
    """Insert an :class:`InputMeans` before every quantized layer; returns them by layer name."""
    observers = {}
    for layer, _, _ in quantized_layers(gm):
        observers[layer.name] = insert_observer(gm, layer, "input_mean",
                                                InputMeans(channel_dim=-1 if layer.target is F.linear else 1))
    gm.recompile()
    return observers


def insert_observer(gm: fx.GraphModule, layer: fx.Node, suffix: str, observer: nn.Module) -> nn.Module:
    """Put the identity ``observer`` (as ``<layer>_<suffix>``) between ``layer`` and its input; returns it.
    The caller recompiles."""
    name = f"{layer.name}_{suffix}"
    gm.add_submodule(name, observer)
    with gm.graph.inserting_before(layer):
        node = gm.graph.call_module(name, (layer.args[0],))
    layer.update_arg(0, node)
    return observer


def remove_observers(gm: fx.GraphModule, cls: type[nn.Module] | tuple[type[nn.Module], ...] = InputMeans
                     ) -> fx.GraphModule:
    """Take every identity observer of class ``cls`` (a class or a tuple; :class:`InputMeans` by default) out of
    the graph."""
    for node in list(gm.graph.nodes):
        if node.op == "call_module" and isinstance(gm.get_submodule(node.target), cls):
            node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)
            gm.delete_submodule(node.target)
    gm.graph.lint()
    gm.recompile()
    return gm


def expand_to_weight(layer: fx.Node, per_input_channel: Tensor, weight: Tensor) -> Tensor:
    """Spread a per-input-channel quantity over the layer's weight tensor (its shape)."""
    groups = groups_of(layer)
    v = per_input_channel.to(weight.device, torch.float32)
    if layer.target is F.linear:
        return v.reshape(1, -1).expand_as(weight)
    spatial = (1,) * (weight.dim() - 2)
    if layer.target in TRANSPOSED_CONVS:  # weight [in, out/groups, k...]
        return v.reshape((-1, 1) + spatial).expand_as(weight)
    out_ch, in_per_group = weight.shape[:2]  # weight [out, in/groups, k...]
    per_out = v.reshape(groups, in_per_group).repeat_interleave(out_ch // groups, dim=0)
    return per_out.reshape((out_ch, in_per_group) + spatial).expand_as(weight)
