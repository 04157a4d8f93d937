"""Softmax shift: recentre the logits a softmax reads, through the bias of the layer before it.

``softmax(z + c) == softmax(z)`` for a constant ``c``.  When a conv/linear feeds
only a softmax, adding ``-(max + min) / 2`` of its calibrated output to its bias
centres that output on zero, so a symmetric grid covers it with half the
threshold.  Runs after calibration, before freezing: the observed histogram is
shifted with the bias, so no second calibration pass is needed.
"""

from __future__ import annotations

from torch import fx

from mct_fx.graph_utils import LAYERS, attr_value, param_source, quantizer_nodes, set_layer_bias
from mct_fx.meta import quantized_node
from mct_fx.quantizers.modules import ActivationQuantizer
from mct_fx.tpc.matching import annotation

__all__ = ["shift_softmax_inputs"]

_SOFTMAX = ("Softmax", "LogSoftmax")


def shift_softmax_inputs(gm: fx.GraphModule) -> int:
    """Shift the bias of every layer whose quantized output feeds only softmaxes; returns how many."""
    names = {n.name: n for n in gm.graph.nodes}
    shifted = 0
    for qnode, q in quantizer_nodes(gm, ActivationQuantizer):
        layer = names.get(quantized_node(qnode))
        if (layer is None or layer.op != "call_function" or layer.target not in LAYERS or q.mode != "observe"
                or q.observer.empty or len(layer.users) != 1):
            continue
        if not qnode.users or not all(annotation(u) is not None and annotation(u).op in _SOFTMAX
                                      for u in qnode.users):
            continue
        shift = -float(q.observer.min + q.observer.max) / 2
        weight = attr_value(gm, param_source(layer.args[1]))
        bias = attr_value(gm, param_source(layer.args[2]))  # a bias quantizer, still observing, reads the new one
        base = bias.detach() if bias is not None else weight.new_zeros(weight.shape[0])
        set_layer_bias(gm, layer, base + shift)
        q.observer.shift(shift)
        shifted += 1
    gm.recompile()
    return shifted
