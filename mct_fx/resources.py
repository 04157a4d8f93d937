"""Resource utilization of a quantized GraphModule, read from its graph."""

from __future__ import annotations

from torch import fx

from mct_fx.graph_utils import quantizer_nodes
from mct_fx.quantizers.modules import WeightQuantizer

__all__ = ["weights_memory"]


def weights_memory(gm: fx.GraphModule) -> tuple[int, int]:
    """``(float bytes, quantized bytes)`` of the parameters ``gm`` computes with.

    A parameter read through a frozen weight quantizer counts ``n_bits / 8`` bytes
    per element when quantized; every other parameter (biases, float layers) 4.
    """
    params = dict(gm.named_parameters())
    bits = {}
    for node, q in quantizer_nodes(gm, WeightQuantizer):
        src = node.args[0] if node.args else None
        if isinstance(src, fx.Node) and src.op == "get_attr" and src.target in params and q.mode == "frozen":
            bits[src.target] = q.n_bits
    float_bytes = sum(p.numel() * 4 for p in params.values())
    quant_bytes = sum(p.numel() * bits.get(name, 32) / 8 for name, p in params.items())
    return float_bytes, int(round(quant_bytes))
