"""ReLU bound to a power of two: ``layer -> ReLU6 -> layer`` rescaled to fill its grid.

An unsigned power-of-two grid for ReLU6 covers ``[0, 8)`` and wastes a quarter of
its codes above 6.  Scaling the first layer by ``b / 6``, the bound to ``b`` (a
``hardtanh(0, b)``) and the next layers' kernels by ``6 / b`` keeps the float
function (ReLU-like functions are positively homogeneous) and fills the grid.
``b`` is the grid's top code, ``8 * (1 - 2**-n)`` for ``n`` bits, not 8 itself:
saturated values (often many) then sit exactly on a grid point, where a bound of
8 would clip every one of them by a step.  Also for ``Hardtanh(0, b)`` with ``b`` not a power of two.  The
scaled activation may reach the next layers through reshapes, dropout and
max-pooling; every path must end in a layer.  Runs after annotation (the grid's
bits and method are known there) on activations with an unsigned power-of-two grid.
"""

from __future__ import annotations

import math

from torch import fx

from mct_fx.graph_utils import LAYERS, SCALE_COMMUTING, attr_value, owned_param, set_param
from mct_fx.quantizers.clamp import BoundedReLU
from mct_fx.quantizers.params import QuantMethod
from mct_fx.tpc.matching import annotation
from mct_fx.tpc.schema import Signedness
from mct_fx.tpc.vocabulary import op_name

__all__ = ["bound_relus_to_power_of_two", "POT_BOUND"]

POT_BOUND = 8.0


def _bound(node: fx.Node, gm: fx.GraphModule) -> float | None:
    """The upper bound of a ReLU6 / Hardtanh(0, b) node (None for anything else)."""
    name = op_name(node, gm) if node.op.startswith("call_") else None
    if name == "ReLU6":
        return 6.0
    if name != "HardTanh":
        return None
    if node.op == "call_module":
        m = gm.get_submodule(node.target)
        lo, hi = m.min_val, m.max_val
    else:
        params = dict(zip(("input", "min_val", "max_val"), node.args[:3], strict=False)) | dict(node.kwargs)
        lo, hi = params.get("min_val", -1.0), params.get("max_val", 1.0)
    return float(hi) if lo == 0 and hi > 0 else None


def _weighted(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target in LAYERS and not node.kwargs


def _consumers(node: fx.Node, gm: fx.GraphModule) -> list[fx.Node] | None:
    """The layers every path from ``node`` reaches through scale-commuting ops, or None."""
    if not node.users:
        return None
    out = []
    for user in node.users:
        if _weighted(user) and user.args[0] is node and owned_param(user.args[1]):
            out.append(user)
            continue
        if user.op.startswith("call_") and op_name(user, gm) in SCALE_COMMUTING:
            below = _consumers(user, gm)
            if below is not None:
                out += below
                continue
        return None
    return out


def _grid_top(act: fx.Node) -> float | None:
    """Largest code of the unsigned power-of-two grid that will quantize ``act`` (None: no such grid)."""
    ann = annotation(act)
    if ann is None or not ann.quantize_output or ann.config.signedness is Signedness.SIGNED:
        return None
    if ann.config.activation_method is not QuantMethod.POWER_OF_TWO:
        return None
    return POT_BOUND * (1 - 2.0 ** -ann.config.activation_n_bits)


def bound_relus_to_power_of_two(gm: fx.GraphModule) -> int:
    """Rescale every matching ``layer -> ReLU6/Hardtanh(0, b) -> layers``, in place; returns how many."""
    done = 0
    for act in list(gm.graph.nodes):
        bound, top = _bound(act, gm), _grid_top(act)
        if bound is None or top is None or math.log2(bound).is_integer() or not act.args:
            continue
        first = act.args[0]
        if not (isinstance(first, fx.Node) and _weighted(first) and len(first.users) == 1
                and owned_param(first.args[1]) and (first.args[2] is None or owned_param(first.args[2]))):
            continue
        consumers = _consumers(act, gm)
        if consumers is None:
            continue
        factor = top / bound
        for arg in first.args[1:3]:
            if arg is not None:
                t = attr_value(gm, arg)
                set_param(gm, arg.target, t.detach() * factor, t)
        for layer in set(consumers):
            w = attr_value(gm, layer.args[1])
            set_param(gm, layer.args[1].target, w.detach() / factor, w)
        target = f"{act.name}_bounded"
        gm.add_submodule(target, BoundedReLU(top).to(attr_value(gm, first.args[1]).device))
        act.op, act.target, act.args, act.kwargs = "call_module", target, (first,), {}
        done += 1
    gm.graph.lint()
    gm.delete_all_unused_submodules()
    gm.recompile()
    return done

