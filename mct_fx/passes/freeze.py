"""Freeze quantizers: choose every grid (threshold search) and switch to fake-quantization."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, fx

from mct_fx.config import QuantConfig
from mct_fx.graph_utils import attr_value, quantizer_nodes
from mct_fx.meta import Role, quantized_node, role_of
from mct_fx.passes.shift_negative import shiftable_quantizers
from mct_fx.quantizers.modules import ActivationQuantizer, WeightQuantizer
from mct_fx.quantizers.search import ErrorMethod
from mct_fx.tpc.matching import annotation
from mct_fx.tpc.vocabulary import UNIT_RANGE_OPS

__all__ = ["freeze_quantizers", "activation_freezer", "error_method"]


def _source_annotation(nodes: dict[str, fx.Node], qnode: fx.Node | None):
    """The TPC annotation of the node quantizer node ``qnode`` quantizes (None when there is none)."""
    source = nodes.get(quantized_node(qnode)) if qnode is not None else None
    return annotation(source) if source is not None else None


def error_method(nodes: dict[str, fx.Node], qnode: fx.Node | None, kind: str, default: ErrorMethod) -> ErrorMethod:
    """The error method of quantizer node ``qnode`` for ``kind`` ("activation" / "weights"): its source
    node's override, else ``default``.  ``nodes``: the graph's nodes by name."""
    ann = _source_annotation(nodes, qnode)
    return ann.error_methods.get(kind, default) if ann is not None else default


def activation_freezer(gm: fx.GraphModule, config: QuantConfig) -> Callable[[str, ActivationQuantizer], None]:
    """``freeze(target, q)``: freeze activation quantizer ``q`` as the one at ``gm.<target>`` would be.

    (Same error method, shift-negative decision, outlier filter and range cap; ``q`` need not be in the
    graph.)  An unsigned power-of-two / symmetric grid on an op whose outputs lie in [0, 1] (softmax,
    sigmoid) gets a threshold of at most 1: the search may prefer 2 when many values sit at 1 itself
    (an SSD's background column), since 1 is just off the grid, but that doubles the step of every
    other value (the scores a detector reads) to save values at 1 less than a step (TFLite fixes these
    outputs at 1/256 for the same reason).
    """
    shiftable = shiftable_quantizers(gm) if config.shift_negative_correction else set()
    by_target = {n.target: n for n in gm.graph.nodes if n.op == "call_module"}
    nodes = {n.name: n for n in gm.graph.nodes}

    def freeze(target: str, q: ActivationQuantizer) -> None:
        if q.observer.empty:
            raise RuntimeError(f"activation quantizer {target!r} saw no data: was calibration run?")
        qnode = by_target.get(target)
        error = error_method(nodes, qnode, "activation", config.activation_error_method)
        q.freeze(error, config.lp_norm,
                 shift_negative_ratio=config.shift_negative_ratio if target in shiftable else None,
                 z_threshold=config.z_threshold, shift_negative_search=config.shift_negative_params_search)
        ann = _source_annotation(nodes, qnode)
        unit = 2.0 ** -q.n_bits  # the step of an unsigned grid of threshold 1
        if ann is not None and ann.op in UNIT_RANGE_OPS and not q.signed and q.method.symmetric_grid \
                and float(q.scale) > unit:
            q.set_grid(torch.tensor(unit), torch.zeros(()))

    return freeze


def freeze_quantizers(gm: fx.GraphModule, config: QuantConfig,
                      importance: dict[str, Tensor] | None = None) -> fx.GraphModule:
    """Search the grid of every observing quantizer (weights from their tensors, activations from histograms).

    With ``config.shift_negative_correction``, activations whose shift the next
    linear layer can absorb may get a shifted unsigned grid (see :mod:`.shift_negative`).
    ``importance``: per-element weights of the error of a layer's kernel, by layer
    name (the Hessian diagonal, which the HMSE error method needs).
    """
    freeze_activation = activation_freezer(gm, config)
    nodes = {n.name: n for n in gm.graph.nodes}

    for node, q in quantizer_nodes(gm, ActivationQuantizer):
        if q.mode == "observe":
            freeze_activation(node.target, q)
    for node, q in quantizer_nodes(gm, WeightQuantizer):
        if q.mode != "observe":
            continue
        weight = attr_value(gm, node.args[0])
        if weight is None:
            raise RuntimeError(f"weight quantizer {node.target!r} does not read a parameter")
        q.freeze(weight, error_method(nodes, node, "weights", config.weights_error_method), config.lp_norm,
                 importance=_importance(node, importance))
    return gm


def _importance(qnode: fx.Node, importance: dict[str, Tensor] | None) -> Tensor | None:
    """The kernel-error weights of a kernel quantizer's layer (biases have none)."""
    record = role_of(qnode)
    if importance is None or record is None or record.role is not Role.WEIGHT:
        return None
    return importance.get(record.node)
