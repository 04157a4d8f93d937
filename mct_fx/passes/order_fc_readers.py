"""Reorder the readers of a 1x1 map so that the IMX500 converter does not read it as a vector.

imxconv-pt 3.19 treats a 1x1 convolution on a 1x1 map as a fully connected layer.  When
such a layer's output is read by several layers and the first of them (in graph order) is
again fully connected, the converter lays the tensor out as a vector and then fails on
the other readers with ``requirement failed: should be 3 or 4 dimensions for tensor
reshape, but got: 1``.  SSD heads on small inputs do this: the last but one extra layer
feeds the next extra layer (1x1 convolution) and the head's depthwise convolutions.
Reading it first with one of the other layers converts (measured; the readers' order is
all that changes, so the function is the same).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import fx

from mct_fx.graph_utils import groups_of, tensor_shape

__all__ = ["order_fc_readers"]


def _fully_connected(node: fx.Node) -> bool:
    """A 1x1 ungrouped 2-D convolution of a 1x1 map, as the converter sees one."""
    if not (node.op == "call_function" and node.target is F.conv2d):
        return False
    x, w = tensor_shape(node.args[0]), tensor_shape(node.args[1])
    return x is not None and w is not None and x[-2:] == (1, 1) and w[-2:] == (1, 1) and groups_of(node) == 1


def _read_through(node: fx.Node) -> fx.Node:
    """``node`` or, when its only reader is a one-input op (activation, quantizer), that op's, repeatedly:
    the tensor the readers of a layer's output actually read."""
    while len(node.users) == 1:
        (user,) = node.users
        if user.op == "output" or len(user.all_input_nodes) != 1:
            break
        node = user
    return node


def _ancestors_after(node: fx.Node, position: dict[fx.Node, int], start: int) -> list[fx.Node]:
    """``node`` and the nodes it depends on that come after ``position`` ``start``, in graph order."""
    seen, stack = set(), [node]
    while stack:
        n = stack.pop()
        if n in seen or position[n] <= start:
            continue
        seen.add(n)
        stack.extend(n.all_input_nodes)
    return sorted(seen, key=position.__getitem__)


def order_fc_readers(gm: fx.GraphModule) -> list[str]:
    """Move, in place, a reader that is not fully connected before the first reader of each fully
    connected layer's output whose first reader is fully connected; returns the moved readers' names.

    Needs ``tensor_meta`` on the nodes (``ShapeProp``; :func:`~mct_fx.passes.lower_rank.lower_rank`
    leaves it).  A reader that depends on the first reader's result stays where it is."""
    moved = []
    position = {n: i for i, n in enumerate(gm.graph.nodes)}
    for layer in [n for n in gm.graph.nodes if _fully_connected(n)]:
        out = _read_through(layer)
        readers = sorted(out.users, key=position.__getitem__)
        if len(readers) < 2 or not _fully_connected(readers[0]):
            continue
        first = readers[0]
        for other in readers[1:]:
            if _fully_connected(other):
                continue
            chain = _ancestors_after(other, position, position[first] - 1)
            if first in chain:
                continue  # it reads the first reader's result
            for n in chain:
                first.prepend(n)
            moved.append(other.name)
            position = {n: i for i, n in enumerate(gm.graph.nodes)}
            break
    if moved:
        gm.graph.lint()
        gm.recompile()
    return moved
