"""Activation channel equalization: balance per-channel activation ranges across layer -> act -> layer.

A per-tensor activation grid is as coarse as its widest channel makes it; narrow
channels get few codes.  For ``layer1 -> act -> layer2`` with a positively
homogeneous ``act`` (ReLU, LeakyReLU, PReLU, or none), scaling output channel
``c`` of ``layer1`` by ``s_c`` and input channel ``c`` of ``layer2`` by ``1/s_c``
keeps the float function, and ``layer1``'s per-channel weight grids do not see it:

* ``layer2`` depthwise: its per-channel grids do not see ``1/s_c`` either, so every
  channel is brought to the widest range (``s_c = A / a_c``);
* ``layer2`` dense (conv with groups 1, or linear): shrinking column ``c`` costs its
  weight resolution, so activation and weight ranges are balanced,
  ``s_c ~ sqrt(w_c / a_c)`` (cross-layer equalization on the activation side),
  normalised so that the widest channel keeps its range.

``a_c`` is the largest ``|act|`` of channel ``c`` on the example batch; scales stay
within ``[1/32, 32]`` and dead channels are left alone.  Runs on the functional
form, after BN folding and collapsing, before annotation.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

from mct_fx.graph_utils import LAYERS, attr_value, groups_of, owned_param, set_param
from mct_fx.passes.layer_inputs import expand_to_weight
from mct_fx.tpc.vocabulary import op_name

__all__ = ["equalize_channels", "MAX_SCALE"]

MAX_SCALE = 32.0
_HOMOGENEOUS = ("ReLU", "LeakyReLU", "PReLU")


class _ChannelMax(nn.Module):
    """Identity that records the largest ``|x|`` of each channel."""

    def __init__(self, channel_dim: int):
        super().__init__()
        self.channel_dim = channel_dim
        self.value: Tensor | None = None

    def forward(self, x: Tensor) -> Tensor:
        dim = self.channel_dim % x.dim()
        m = x.detach().abs().amax([d for d in range(x.dim()) if d != dim]).float()
        self.value = m if self.value is None else torch.maximum(self.value, m)
        return x


def _layer(node: object) -> bool:
    return (isinstance(node, fx.Node) and node.op == "call_function" and node.target in LAYERS
            and not node.kwargs and owned_param(node.args[1]))


def _pairs(gm: fx.GraphModule) -> list[tuple[fx.Node, fx.Node, fx.Node]]:
    """``(layer1, node whose output is scaled, layer2)`` chains that can be equalized."""
    out = []
    for first in gm.graph.nodes:
        if not _layer(first) or len(first.users) != 1 or (first.args[2] is not None and not owned_param(first.args[2])):
            continue
        nxt = next(iter(first.users))
        if nxt.op.startswith("call_") and op_name(nxt, gm) in _HOMOGENEOUS and nxt.args[0] is first:
            if len(nxt.users) != 1:
                continue
            mid, second = nxt, next(iter(nxt.users))
        else:
            mid, second = first, nxt
        if not _layer(second) or second.args[0] is not mid or (second.target is F.linear) != (first.target is F.linear):
            continue
        channels = attr_value(gm, first.args[1]).shape[0]
        if second.target is not F.linear and groups_of(second) not in (1, channels):
            continue
        out.append((first, mid, second))
    return out


def _scales(a: Tensor, second: fx.Node, w2: Tensor) -> Tensor:
    alive = a > 0
    widest = a.max()
    depthwise = second.target is not F.linear and groups_of(second) > 1
    if depthwise:
        s = torch.where(alive, widest / a.clamp(min=1e-30), torch.ones_like(a))
    else:
        cols = w2.detach().abs().float().transpose(0, 1).reshape(w2.shape[1], -1).amax(1)
        s = torch.where(alive & (cols > 0), torch.sqrt(cols / a.clamp(min=1e-30)), torch.ones_like(a))
        s = s * widest / (a * s).max().clamp(min=1e-30)
    return s.clamp(1 / MAX_SCALE, MAX_SCALE)


def equalize_channels(gm: fx.GraphModule, example: tuple[tuple, dict]) -> int:
    """Equalize every matching chain using activation ranges from ``example`` ``(args, kwargs)``; returns how many."""
    pairs = _pairs(gm)
    if not pairs:
        return 0
    observers = {}
    for i, (first, mid, _) in enumerate(pairs):
        name = f"_equalize_probe_{i}"
        gm.add_submodule(name, _ChannelMax(-1 if first.target is F.linear else 1))
        with gm.graph.inserting_after(mid):
            probe = gm.graph.call_module(name, (mid,))
        observers[mid] = (probe, gm.get_submodule(name))
    gm.recompile()
    try:
        with torch.no_grad():
            gm(*example[0], **example[1])
    finally:
        for probe, _ in observers.values():
            gm.graph.erase_node(probe)
            gm.delete_submodule(probe.target)
        gm.recompile()
    done = 0
    for first, mid, second in pairs:
        a = observers[mid][1].value
        if a is None:
            continue
        w1, w2 = attr_value(gm, first.args[1]), attr_value(gm, second.args[1])
        s = _scales(a.to(w1.device), second, w2)
        set_param(gm, first.args[1].target, w1.detach() * s.reshape((-1,) + (1,) * (w1.dim() - 1)).to(w1.dtype), w1)
        if first.args[2] is not None:
            b1 = attr_value(gm, first.args[2])
            set_param(gm, first.args[2].target, b1.detach() * s.to(b1.dtype), b1)
        set_param(gm, second.args[1].target, (w2.detach() / expand_to_weight(second, s, w2)).to(w2.dtype), w2)
        done += 1
    gm.graph.lint()
    return done
