"""Small helpers for reading a GraphModule (shared by passes and analyses)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import fx, nn

__all__ = ["attr_value", "model_device", "quantizer_nodes", "groups_of", "TRANSPOSED_CONVS"]

TRANSPOSED_CONVS = (F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d)


def attr_value(gm: fx.GraphModule, node: object) -> torch.Tensor | None:
    """The tensor a ``get_attr`` node reads (None for anything else)."""
    if not isinstance(node, fx.Node) or node.op != "get_attr":
        return None
    owner, _, attr = node.target.rpartition(".")
    return getattr(gm.get_submodule(owner), attr, None)


def model_device(model: nn.Module) -> torch.device:
    """Device of the model's first parameter or buffer (CPU for a stateless model)."""
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


def quantizer_nodes(gm: fx.GraphModule, cls: type) -> list[tuple[fx.Node, nn.Module]]:
    """``(node, module)`` of every ``call_module`` node whose module is a ``cls``."""
    out = []
    for node in gm.graph.nodes:
        if node.op == "call_module":
            module = gm.get_submodule(node.target)
            if isinstance(module, cls):
                out.append((node, module))
    return out


def groups_of(layer: fx.Node) -> int:
    """Groups of a functional conv node (1 for linear).

    ``F.conv*(x, w, b, stride, padding, dilation, groups)`` and
    ``F.conv_transpose*(x, w, b, stride, padding, output_padding, groups, dilation)``
    both keep it at ``args[6]``.
    """
    return int(layer.args[6]) if layer.target is not F.linear and len(layer.args) > 6 else 1
