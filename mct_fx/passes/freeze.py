"""Freeze quantizers: choose every grid (threshold search) and switch to fake-quantization."""

from __future__ import annotations

from torch import fx

from mct_fx.config import QuantConfig
from mct_fx.graph_utils import attr_value, quantizer_nodes
from mct_fx.passes.insert_quantizers import QUANTIZED_FROM
from mct_fx.passes.shift_negative import shiftable_quantizers
from mct_fx.quantizers.modules import ActivationQuantizer, WeightQuantizer
from mct_fx.tpc.matching import annotation

__all__ = ["freeze_quantizers"]


def freeze_quantizers(gm: fx.GraphModule, config: QuantConfig) -> fx.GraphModule:
    """Search the grid of every observing quantizer (weights from their tensors, activations from histograms).

    With ``config.shift_negative_correction``, activations whose shift the next
    linear layer can absorb may get a shifted unsigned grid (see :mod:`.shift_negative`).
    """
    shiftable = shiftable_quantizers(gm) if config.shift_negative_correction else set()
    sources = {n.name: n for n in gm.graph.nodes}

    def error_method(qnode, kind: str, default):
        source = sources.get(qnode.meta.get(QUANTIZED_FROM))
        ann = annotation(source) if source is not None else None
        return ann.error_methods.get(kind, default) if ann is not None else default

    for node, q in quantizer_nodes(gm, ActivationQuantizer):
        if q.mode != "observe":
            continue
        if q.observer.empty:
            raise RuntimeError(f"activation quantizer {node.target!r} saw no data: was calibration run?")
        ratio = config.shift_negative_ratio if node.target in shiftable else None
        q.freeze(error_method(node, "activation", config.activation_error_method), config.lp_norm,
                 shift_negative_ratio=ratio,
                 z_threshold=config.z_threshold, shift_negative_search=config.shift_negative_params_search)
    for node, q in quantizer_nodes(gm, WeightQuantizer):
        if q.mode != "observe":
            continue
        weight = attr_value(gm, node.args[0])
        if weight is None:
            raise RuntimeError(f"weight quantizer {node.target!r} does not read a parameter")
        q.freeze(weight, error_method(node, "weights", config.weights_error_method), config.lp_norm)
    return gm
