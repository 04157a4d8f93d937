"""Box coordinates keep their precision: the ops that compute the boxes an NMS reads get the widest
activation width the target offers there.

A YOLO-style head decodes pixel boxes after its last layer with weights (distances to the box
sides: sub / add / cat, times the strides). On an 8-bit power-of-two grid those coordinates
span hundreds of pixels in 256 steps: a 160x160 detector measured here gets 4-pixel steps and
loses 15 mAP@0.5:0.95 points (mAP@0.5 barely moves). MCT's users set those ops to 16 bits by
name (Ultralytics' IMX export does); here they are found from the graph: the nodes whose
every use leads only to an NMS's boxes input, back to (not including) the last layer with
weights (an SSD's ``FasterRCNNBoxDecode`` already decodes in float: nothing to widen). They
become overrides put before the user's own (so the user's win), which pins them against mixed
precision. On a target without a wider candidate (``imx500``), a warning names
them and the target to use (``imx500_16bit``).
"""

from __future__ import annotations

import logging

from torch import fx

from mct_fx.config import LayerOverride
from mct_fx.tpc.matching import annotation
from mct_fx.tpc.vocabulary import POSTPROCESS_OPS

__all__ = ["box_nodes", "box_overrides"]

log = logging.getLogger("mct_fx")

_NMS_OPS = ("MulticlassNMS", "MulticlassNMSWithIndices", "MulticlassNMSOBB")


def _has_weights(node: fx.Node, groups: dict[str, list[fx.Node]]) -> bool:
    """``node`` computes with weights: its own kernel, or a kernel fused into it (conv -> act)."""
    return any(annotation(n) is not None and annotation(n).config is not None and annotation(n).config.kernel.enabled
               for n in (node, *groups.get(node.name, ())))


def box_nodes(gm: fx.GraphModule) -> list[fx.Node]:
    """The nodes with a quantized output that compute only what NMS boxes inputs read, in graph order."""
    nms = [n for n in gm.graph.nodes if annotation(n) is not None and annotation(n).op in _NMS_OPS]
    boxes = {n.args[0] if n.args else n.kwargs.get("boxes") for n in nms}
    chain: set[fx.Node] = set()
    groups: dict[str, list[fx.Node]] = {}
    for n in gm.graph.nodes:
        ann = annotation(n)
        if ann is not None and ann.fused_into:
            groups.setdefault(ann.fused_into, []).append(n)
    for node in reversed(gm.graph.nodes):
        ann = annotation(node)
        if (node.op in ("placeholder", "get_attr", "output") or not node.users or _has_weights(node, groups)
                or (ann is not None and ann.op in POSTPROCESS_OPS)):
            continue  # box decoding (SSD) is post-processing: float on the chip, its codes stay as they are
        if node in boxes and all(u in nms for u in node.users) or (
                node not in boxes and all(u in chain for u in node.users)):
            chain.add(node)
    return [n for n in gm.graph.nodes if n in chain and annotation(n) is not None and annotation(n).quantize_output]


def box_overrides(gm: fx.GraphModule) -> tuple[LayerOverride, ...]:
    """Overrides giving each of :func:`box_nodes` its widest activation candidate (when wider than now)."""
    overrides, narrow = [], []
    for node in box_nodes(gm):
        ann = annotation(node)
        widest = max(c.activation_n_bits for c in ann.options.candidates)
        if widest > ann.config.activation_n_bits:
            overrides.append(LayerOverride(name=node.name, activation_n_bits=widest))
        else:
            narrow.append(node)
    if narrow:
        log.warning("the boxes the NMS reads are computed at %d-bit activations (nodes %s): coarse coordinates "
                    "cost mAP at strict IoU; a target with 16-bit activation candidates (imx500_16bit) keeps "
                    "them at 16 bits", annotation(narrow[0]).config.activation_n_bits,
                    ", ".join(n.name for n in narrow))
    return tuple(overrides)
