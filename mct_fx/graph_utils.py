"""Small helpers for reading a GraphModule (shared by passes and analyses)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import fx, nn

__all__ = ["attr_value", "model_device", "quantizer_nodes", "groups_of", "TRANSPOSED_CONVS", "LAYERS",
           "SCALE_COMMUTING", "owned_param",
           "set_param", "set_layer_bias", "param_source", "placeholder_values", "with_outputs", "replace_module"]

TRANSPOSED_CONVS = (F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d)
LAYERS = (F.conv1d, F.conv2d, F.conv3d, F.linear)  # the functional weighted layers passes rewrite
# ops a positive per-tensor scale passes through that have no grid of their own (a quantized op in
# between, e.g. average pooling, would see its range move off its power of two)
SCALE_COMMUTING = ("Dropout", "Identity", "Flatten", "Reshape", "MaxPool")


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


def tensor_shape(node: object) -> tuple[int, ...] | None:
    """The shape ``ShapeProp`` recorded on ``node`` (``tensor_meta``); None for a non-tensor or unrecorded node."""
    meta = node.meta.get("tensor_meta") if isinstance(node, fx.Node) else None
    return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None


def groups_of(layer: fx.Node) -> int:
    """Groups of a functional conv node (1 for linear).

    ``F.conv*(x, w, b, stride, padding, dilation, groups)`` and
    ``F.conv_transpose*(x, w, b, stride, padding, output_padding, groups, dilation)``
    both keep it at ``args[6]``.
    """
    return int(layer.args[6]) if layer.target is not F.linear and len(layer.args) > 6 else 1


def owned_param(node: object) -> bool:
    """A ``get_attr`` node read by one node only: a pass may rewrite the tensor without side effects."""
    return isinstance(node, fx.Node) and node.op == "get_attr" and len(node.users) == 1


def set_param(gm: fx.GraphModule, qualname: str, value: torch.Tensor, like: torch.Tensor | None = None) -> None:
    """Store ``value`` as the parameter ``qualname`` (keeping ``like``'s ``requires_grad``)."""
    owner_name, _, attr = qualname.rpartition(".")
    requires_grad = like.requires_grad if like is not None else True
    setattr(gm.get_submodule(owner_name), attr, nn.Parameter(value, requires_grad=requires_grad))


def param_source(node: object) -> object:
    """The ``get_attr`` node behind ``node``, reading through a quantizer (``call_module``) if there is one."""
    if isinstance(node, fx.Node) and node.op == "call_module" and node.args:
        return node.args[0]
    return node


def layer_bias(gm: fx.GraphModule, layer: fx.Node) -> torch.Tensor | None:
    """The bias tensor of a functional conv/linear ``layer`` (read through its quantizer), or None."""
    return attr_value(gm, param_source(layer.args[2])) if len(layer.args) > 2 else None


def set_layer_bias(gm: fx.GraphModule, layer: fx.Node, value: torch.Tensor) -> None:
    """Set the bias of a functional conv/linear ``layer``, creating the parameter when it has none.

    A new bias goes next to the weight: ``<owner>.bias`` when free, else ``<weight>_bias``.
    """
    bias_node = param_source(layer.args[2]) if len(layer.args) > 2 else None
    if bias_node is not None:
        set_param(gm, bias_node.target, value.to(attr_value(gm, bias_node).dtype), attr_value(gm, bias_node))
        return
    w_node = param_source(layer.args[1])
    w_name = w_node.target
    owner_name, _, attr = w_name.rpartition(".")
    name = f"{owner_name}.bias" if owner_name else "bias"
    if attr != "weight" or getattr(gm.get_submodule(owner_name), "bias", None) is not None:
        name = f"{w_name}_bias"
    weight = attr_value(gm, w_node)
    set_param(gm, name, value.to(weight.dtype), weight)
    with gm.graph.inserting_before(layer):
        layer.update_arg(2, gm.graph.get_attr(name))


def placeholder_values(gm: fx.GraphModule, args: tuple, kwargs: dict) -> list:
    """``args`` then ``kwargs`` in the order of ``gm``'s placeholders (for running it positionally)."""
    names = [n.target for n in gm.graph.nodes if n.op == "placeholder"]
    return list(args) + [kwargs[p] for p in names[len(args):] if p in kwargs]


def with_outputs(gm: fx.GraphModule, names: list[str]) -> fx.GraphModule:
    """A GraphModule sharing ``gm``'s modules that returns the values of the nodes ``names`` (a tuple), and
    computes nothing else."""
    graph = fx.Graph()
    values: dict[fx.Node, fx.Node] = {}
    graph.graph_copy(gm.graph, values)
    by_name = {n.name: values[n] for n in gm.graph.nodes if n in values}
    missing = [n for n in names if n not in by_name]
    if missing:
        raise KeyError(f"no node named {missing[0]!r} in the graph")
    graph.output(tuple(by_name[n] for n in names))
    probe = fx.GraphModule(gm, graph)
    probe.graph.eliminate_dead_code()
    probe.recompile()
    probe.meta.update(gm.meta)
    return probe


def replace_module(gm: nn.Module, target: str, module: nn.Module) -> nn.Module:
    """Put ``module`` at ``target`` (a dotted path); returns the module it replaces."""
    owner_name, _, attr = target.rpartition(".")
    owner = gm.get_submodule(owner_name)
    old = getattr(owner, attr)
    setattr(owner, attr, module)
    return old
