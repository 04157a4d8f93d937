"""Make shift-negative grids explicit: ``x + shift`` before an unsigned grid, ``- shift`` in the next layers.

A shift-negative grid is an unsigned grid with a zero point (see :mod:`.shift_negative`),
numerically the same as shifting the activation up, quantizing it on a zero-based
unsigned grid and subtracting the shift again.  Formats without zero points (the
IMX500's) need that second form: this pass rewrites each such quantizer into

    x -> [16-bit signed grid] -> + shift -> [unsigned grid, zero point 0] -> layers with b - W_q·shift

where each layer reading it (through the ops the shift passes, as the correction
required) takes ``- shift`` into its bias and pads with the shift instead of zero.
The 16-bit grid is there because such formats quantize every tensor, the one before
the add too (MCT's shift-negative correction does the same): it is wide enough that
the grid after the add clips what it would clip, and its step divides that grid's,
so only values within half a 16-bit step of a rounding boundary can round differently.
"""

from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from torch import Tensor, fx

from mct_fx.graph_utils import LAYERS, attr_value, layer_bias, quantizer_nodes, set_layer_bias
from mct_fx.quantizers.modules import ActivationQuantizer, WeightQuantizer
from mct_fx.quantizers.params import QuantMethod, pot_threshold
from mct_fx.tpc.matching import annotation

__all__ = ["explicit_shift", "WIDE_BITS"]

WIDE_BITS = 16
# ops between a shifted activation and the layers absorbing its shift (see shift_negative.py)
_SHIFT_PASSES = ("Dropout", "Identity", "Reshape", "Flatten", "MaxPool", "AvgPool")


class _ShiftPad(torch.autograd.Function):
    """Constant padding with the shift: one ``Pad`` with constant pads in ONNX (``F.pad`` exports as a
    shape computation the converter does not need)."""

    @staticmethod
    def forward(ctx, x: Tensor, padding: tuple[int, ...], value: float) -> Tensor:  # noqa: ARG004
        pads = [p for dim in reversed(padding) for p in (dim, dim)]
        return F.pad(x, pads, value=value)

    @staticmethod
    def symbolic(g, x, padding: tuple[int, ...], value: float):
        pads = [0, 0, *padding] * 2  # ONNX: every dimension's begin, then every dimension's end
        return g.op("Pad", x, g.op("Constant", value_t=torch.tensor(pads, dtype=torch.int64)),
                    g.op("Constant", value_t=torch.tensor(value, dtype=torch.float32)), mode_s="constant")


def _shift_pad(x: Tensor, padding: tuple[int, ...], value: float) -> Tensor:
    return _ShiftPad.apply(x, padding, value)


def explicit_shift(gm: fx.GraphModule) -> list[str]:
    """Rewrite every activation quantizer with a zero point, in place; returns their targets.

    Raises ``ValueError`` naming the quantizer when its shift reaches an op that cannot absorb it.
    """
    shifted = []
    for qnode, q in quantizer_nodes(gm, ActivationQuantizer):
        if not q.affine or q.signed or float(q.zero_point) == 0:
            continue
        shift = float(q.zero_point) * float(q.scale)
        _unshift(gm, qnode, q, shift)
        shifted.append(qnode.target)
    gm.graph.lint()
    gm.recompile()
    return shifted


def _unshift(gm: fx.GraphModule, qnode: fx.Node, q: ActivationQuantizer, shift: float) -> None:
    wide = ActivationQuantizer(QuantMethod.POWER_OF_TWO, WIDE_BITS, signed=True).to(q.scale.device)
    threshold = pot_threshold(torch.tensor(max(shift, float(q.scale) * 2**q.n_bits - shift)))
    wide.set_grid(threshold / 2 ** (WIDE_BITS - 1), torch.zeros(()))
    q.set_grid(q.scale, torch.zeros_like(q.zero_point))
    name = f"{qnode.target}_wide"
    gm.add_submodule(name, wide)
    with gm.graph.inserting_before(qnode):
        before = gm.graph.call_module(name, (qnode.args[0],))
        add = gm.graph.call_function(operator.add, (before, shift))
    qnode.args = (add,)
    stack = list(qnode.users)
    while stack:
        user = stack.pop()
        if user.op == "call_function" and user.target in LAYERS:
            _absorb_shift(gm, user, shift)
            continue
        ann = annotation(user)
        if ann is None or ann.op not in _SHIFT_PASSES:
            raise ValueError(f"quantizer {qnode.target!r}: its shifted grid reaches {user.name!r}, "
                             "which cannot absorb the shift")
        stack.extend(user.users)


def _absorb_shift(gm: fx.GraphModule, layer: fx.Node, shift: float) -> None:
    w_node = layer.args[1]
    q = gm.get_submodule(w_node.target) if w_node.op == "call_module" else None
    q = q if isinstance(q, WeightQuantizer) else None
    weight = attr_value(gm, w_node.args[0] if q is not None else w_node)
    with torch.no_grad():
        w_q = q(weight) if q is not None else weight
        delta = w_q.flatten(1).sum(1) * shift
        bias = layer_bias(gm, layer)
        set_layer_bias(gm, layer, (-delta if bias is None else bias - delta).detach())
    if layer.target is F.linear:
        return
    padding = _explicit_padding(layer, w_q)
    if any(padding):
        with gm.graph.inserting_before(layer):
            padded = gm.graph.call_function(_shift_pad, (layer.args[0], padding, shift))
        args = list(layer.args)
        args[0], args[4] = padded, tuple(0 for _ in padding)
        layer.args = tuple(args)


def _explicit_padding(layer: fx.Node, weight: Tensor) -> tuple[int, ...]:
    """The symmetric zero padding per spatial dimension of a functional conv node."""
    dims = weight.dim() - 2
    padding = layer.args[4] if len(layer.args) > 4 else layer.kwargs.get("padding", 0)
    if isinstance(padding, str):
        if padding == "valid":
            return (0,) * dims
        dilation = layer.args[5] if len(layer.args) > 5 else 1
        dilation = (dilation,) * dims if isinstance(dilation, int) else tuple(dilation)
        total = [d * (k - 1) for d, k in zip(dilation, weight.shape[2:], strict=True)]
        if any(t % 2 for t in total):
            raise ValueError(f"layer {layer.name!r}: padding='same' with an even kernel pads unevenly; "
                             "the shift-negative correction cannot move into it")
        return tuple(t // 2 for t in total)
    return (padding,) * dims if isinstance(padding, int) else tuple(padding)
