"""Concat threshold unification: the quantized inputs of a concat take the concat's grid.

Hardware that concatenates integer tensors without requantizing needs every input
on the output's grid.  After freezing, each input quantizer of a quantized
concat copies the concat's output grid (bits, signedness, scale, zero point), so
the concat's own quantizer becomes an identity on the concatenated codes.  An
input quantizer that also feeds other ops gives them the same grid.
"""

from __future__ import annotations

from torch import fx

from mct_fx.graph_utils import quantizer_nodes
from mct_fx.meta import quantized_node
from mct_fx.quantizers.modules import ActivationQuantizer
from mct_fx.tpc.matching import annotation

__all__ = ["unify_concat_grids"]


def _tensor_inputs(node: fx.Node) -> list[fx.Node]:
    tensors = node.args[0] if node.args else node.kwargs.get("tensors", ())
    return [t for t in tensors if isinstance(t, fx.Node)] if isinstance(tensors, (list, tuple)) else []


def unify_concat_grids(gm: fx.GraphModule) -> int:
    """Give the input quantizers of every quantized concat the concat's grid; returns how many concats."""
    names = {n.name: n for n in gm.graph.nodes}
    unified = 0
    for qnode, q in quantizer_nodes(gm, ActivationQuantizer):
        concat = names.get(quantized_node(qnode))
        if concat is None or annotation(concat) is None or annotation(concat).op != "Concatenate":
            continue
        if q.mode != "frozen":
            continue
        inputs = [gm.get_submodule(t.target) for t in _tensor_inputs(concat) if t.op == "call_module"]
        inputs = [m for m in inputs if isinstance(m, ActivationQuantizer) and m.mode == "frozen"]
        for m in inputs:
            m.copy_grid(q)
        unified += bool(inputs)
    return unified
