"""Rewrite ``view -> permute -> reshape`` chains through tensors above 4-D into chains of at most 4-D.

Detection heads reorder their conv output into per-anchor rows with a 5-D detour;
torchvision's SSD / SSDLite heads do

    x [N, A*K, H, W] -> view(N, A, K, H, W) -> permute(0, 3, 4, 1, 2) -> reshape(N, -1, K)

and the IMX500 converter refuses any tensor above 4-D.  Only the element order
that reaches the last reshape matters, and that order is fixed by which source
dimensions the permutation keeps adjacent: each run of consecutive source dims
can be one dim.  The chain above becomes ``view(N, A*K, H*W) -> permute(0, 2, 1)
-> reshape(N, -1, K)``, the same values in the same order.
"""

from __future__ import annotations

import math

import torch
from torch import fx
from torch.fx.passes.shape_prop import ShapeProp

from mct_fx.graph_utils import tensor_shape

__all__ = ["lower_rank", "merged_permutation", "MAX_RANK"]

MAX_RANK = 4
_VIEWS = {("call_method", "view"), ("call_method", "reshape"), ("call_function", torch.reshape)}
_PERMUTES = {("call_method", "permute"), ("call_function", torch.permute)}


def merged_permutation(shape: tuple[int, ...], perm: tuple[int, ...]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """``(shape', perm')``: ``shape`` with each run of dims that ``perm`` keeps adjacent and in order
    merged into one, and the permutation of the merged dims (the same element order after it).

    Dims of size 1 order nothing and are dropped; dim 0 (the batch) stays a dim of its own."""
    kept = [d for d in range(len(shape)) if d == 0 or shape[d] != 1]
    runs: list[list[int]] = []
    for d in (kept.index(d) for d in perm if d in kept):
        if runs and runs[-1][0] != 0 and d == runs[-1][-1] + 1:
            runs[-1].append(d)
        else:
            runs.append([d])
    by_source = sorted(runs)
    merged = tuple(math.prod(shape[kept[d]] for d in run) for run in by_source)
    return merged, tuple(by_source.index(run) for run in runs)


def _perm_of(node: fx.Node) -> tuple[int, ...]:
    dims = node.args[1:] if node.op == "call_method" else (node.args[1],)
    if len(dims) == 1 and isinstance(dims[0], (tuple, list)):
        dims = tuple(dims[0])
    return tuple(int(d) for d in dims)


def lower_rank(gm: fx.GraphModule, example_inputs: tuple[torch.Tensor, ...]) -> list[str]:
    """Rewrite in place each ``view/reshape -> permute -> view/reshape`` whose middle tensors are above
    4-D and whose merged form is not; returns the names of the permutes rewritten.

    Shapes come from running ``gm`` on ``example_inputs`` (static on export); every node has its
    ``tensor_meta`` afterwards."""
    ShapeProp(gm).propagate(*example_inputs)  # the inputs' own shapes: the new reshapes take them literally
    rewritten = []
    for permute in list(gm.graph.nodes):
        if (permute.op, permute.target) not in _PERMUTES or len(permute.users) == 0:
            continue
        view = permute.args[0]
        if not (isinstance(view, fx.Node) and (view.op, view.target) in _VIEWS and len(view.users) == 1):
            continue
        shape, source = tensor_shape(view), view.args[0]
        if shape is None or len(shape) <= MAX_RANK or not isinstance(source, fx.Node):
            continue
        if not all((u.op, u.target) in _VIEWS for u in permute.users):
            continue  # something reads the permuted tensor's own layout
        merged, perm = merged_permutation(shape, _perm_of(permute))
        if len(merged) > MAX_RANK:
            continue
        if perm == tuple(range(len(perm))):
            permute.replace_all_uses_with(source)  # only unit dims moved: the last reshape alone does it
        else:
            with gm.graph.inserting_before(view):
                new_view = gm.graph.call_method("reshape", (source, *merged))
                permute.replace_all_uses_with(gm.graph.call_method("permute", (new_view, *perm)))
        gm.graph.erase_node(permute)
        gm.graph.erase_node(view)
        rewritten.append(permute.name)
    if rewritten:
        gm.graph.eliminate_dead_code()
        gm.delete_all_unused_submodules()  # what only dead nodes called (its quantizers would reach the export)
        gm.graph.lint()
        gm.recompile()
        ShapeProp(gm).propagate(*example_inputs)  # the new nodes' shapes, for the checks after this pass
    return rewritten
