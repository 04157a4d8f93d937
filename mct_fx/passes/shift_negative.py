"""Shift-negative correction (SNC): which activation quantizers may use a shifted unsigned grid.

Activations like SiLU, Hardswish or GELU are mostly positive with a small
negative tail; a signed grid wastes half its codes on that tail.  Shifting the
activation up by ``s`` makes it non-negative, so an unsigned grid (twice the
resolution) fits; the next linear layer absorbs the shift (``b - W s``, padding
with ``s``).  That is only possible when every consumer of the quantized
activation reaches a Conv / Linear through ops the shift passes through
unchanged (dropout, reshapes, max-pooling, padding-free average pooling).
This pass finds those quantizers; the grid itself is chosen in
:meth:`ActivationQuantizer.freeze` (a shifted grid is a zero point on an
unsigned power-of-two/symmetric grid, which is numerically the add + bias
correction).
"""

from __future__ import annotations

from torch import fx

from mct_fx.graph_utils import LAYERS, quantizer_nodes
from mct_fx.meta import quantized_node
from mct_fx.quantizers.modules import ActivationQuantizer
from mct_fx.tpc.matching import annotation

__all__ = ["SNC_OPS", "shiftable_quantizers"]

SNC_OPS = ("Swish", "HardSwish", "Gelu", "Elu", "PReLU", "LeakyReLU", "Mish")
_PASS_THROUGH = ("Dropout", "Identity", "Reshape", "Flatten", "MaxPool", "AvgPool")


def _zero_padding(node: fx.Node, gm: fx.GraphModule) -> bool:
    if node.op == "call_module":
        padding = getattr(gm.get_submodule(node.target), "padding", 0)
    else:
        padding = node.kwargs.get("padding", node.args[3] if len(node.args) > 3 else 0)
    return all(p == 0 for p in (padding if isinstance(padding, (tuple, list)) else (padding,)))


def _absorbed(node: fx.Node, gm: fx.GraphModule) -> bool:
    """Every path from ``node`` ends in the data input of a Conv/Linear, through pass-through ops only."""
    if not node.users:
        return False
    for user in node.users:
        if user.op == "call_function" and user.target in LAYERS and user.args[0] is node:
            continue
        ann = annotation(user)
        if ann is None or ann.op not in _PASS_THROUGH or ann.quantize_output:
            return False
        if ann.op == "AvgPool" and not _zero_padding(user, gm):
            return False
        if not _absorbed(user, gm):
            return False
    return True


def shiftable_quantizers(gm: fx.GraphModule) -> set[str]:
    """Targets of the activation quantizers on SNC ops whose shift the next linear layers can absorb."""
    names = {n.name: n for n in gm.graph.nodes}
    out = set()
    for qnode, _ in quantizer_nodes(gm, ActivationQuantizer):
        source = names.get(quantized_node(qnode))
        ann = annotation(source) if source is not None else None
        if ann is not None and ann.op in SNC_OPS and _absorbed(qnode, gm):
            out.add(qnode.target)
    return out
