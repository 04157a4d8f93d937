"""Turn Conv/ConvTranspose/Linear module calls into functional calls on explicit weights.

After this pass every weighted layer reads ``F.conv2d(x, <weight>, <bias>, ...)``
with its weight and bias as ``get_attr`` nodes, exactly like a model written
with functional calls on parameters.  One form means one code path for weight
quantizers, BN folding and every later pass, and the weight quantizer shows in
``print(gm.code)``.  Node names are kept; the module stays in place as the
holder of its parameters (so ``state_dict`` keys do not change).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import fx, nn

__all__ = ["functionalize_layers"]

_CONV = {nn.Conv1d: F.conv1d, nn.Conv2d: F.conv2d, nn.Conv3d: F.conv3d}
# Positional parameters (and defaults) of the functional layers; every weighted
# layer ends up called with all of them positionally, so passes can rely on
# args[1] = weight, args[2] = bias, args[6] = groups (conv and conv_transpose).
_CONV_PARAMS = (("input", None), ("weight", None), ("bias", None), ("stride", 1), ("padding", 0),
                ("dilation", 1), ("groups", 1))
_CONV_T_PARAMS = (("input", None), ("weight", None), ("bias", None), ("stride", 1), ("padding", 0),
                  ("output_padding", 0), ("groups", 1), ("dilation", 1))
_PARAMS = {**{f: _CONV_PARAMS for f in (F.conv1d, F.conv2d, F.conv3d)},
           **{f: _CONV_T_PARAMS for f in (F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d)},
           F.linear: (("input", None), ("weight", None), ("bias", None))}
_CONV_T = {nn.ConvTranspose1d: F.conv_transpose1d, nn.ConvTranspose2d: F.conv_transpose2d,
           nn.ConvTranspose3d: F.conv_transpose3d}


def _canonical_args(node: fx.Node) -> tuple | None:
    """All positional arguments of a functional conv/linear call, defaults filled in."""
    params = _PARAMS[node.target]
    if len(node.args) > len(params) or set(node.kwargs) - {name for name, _ in params}:
        return None
    values = list(node.args)
    for name, default in params[len(node.args):]:
        values.append(node.kwargs.get(name, default))
    return tuple(values)


def functionalize_layers(gm: fx.GraphModule) -> fx.GraphModule:
    """Rewrite every exact nn.Conv*/ConvTranspose*/Linear call in place, and put every
    functional conv/linear call in canonical positional form; returns ``gm``."""
    graph = gm.graph
    for node in list(graph.nodes):
        if node.op == "call_function" and node.target in _PARAMS:
            canonical = _canonical_args(node)
            if canonical is not None:
                node.args, node.kwargs = canonical, {}
            continue
        if node.op != "call_module":
            continue
        module = gm.get_submodule(node.target)
        kind = type(module)
        if kind not in _CONV and kind not in _CONV_T and kind is not nn.Linear:
            continue
        if len(node.args) != 1 or node.kwargs:
            continue  # e.g. ConvTranspose called with output_size: keep the module call
        x = node.args[0]
        with graph.inserting_before(node):
            weight = graph.get_attr(f"{node.target}.weight")
            bias = graph.get_attr(f"{node.target}.bias") if module.bias is not None else None
            if kind in _CONV and module.padding_mode != "zeros":
                x = graph.call_function(F.pad, (x, module._reversed_padding_repeated_twice),
                                        {"mode": module.padding_mode})
        if kind is nn.Linear:
            target, args = F.linear, (x, weight, bias)
        elif kind in _CONV:
            padding = module.padding if module.padding_mode == "zeros" else 0
            target = _CONV[kind]
            args = (x, weight, bias, module.stride, padding, module.dilation, module.groups)
        else:
            target = _CONV_T[kind]
            args = (x, weight, bias, module.stride, module.padding, module.output_padding, module.groups,
                    module.dilation)
        node.op, node.target, node.args = "call_function", target, args
    graph.lint()
    gm.recompile()
    return gm
