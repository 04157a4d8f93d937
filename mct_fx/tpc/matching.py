"""Match a TPC onto a traced graph: annotate each node with its quantization options.

This decides *what* is quantized (PT2E-style annotation), not *how*: the
annotations live in ``node.meta["mct_fx"]`` and the insertion pass reads them.
Inside a fused group (conv -> relu, linear -> act, add -> relu) only the last
node's output is quantized.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field

from torch import fx
from torch.utils._pytree import tree_leaves

from mct_fx.graph_utils import with_outputs
from mct_fx.meta import ANNOTATION
from mct_fx.tpc.schema import OpQuantConfig, QuantConfigOptions, TargetPlatformCapabilities
from mct_fx.tpc.vocabulary import POSTPROCESS_OPS, op_name

__all__ = ["Annotation", "annotate", "annotation", "is_float_tensor", "produces_float", "describe_target",
           "measured_outputs", "measured_view", "META_KEY"]

META_KEY = ANNOTATION


@dataclass
class Annotation:
    """What the target says about one node."""

    op: str | None  # operator-set name; None: unknown op, stays float
    options: QuantConfigOptions | None  # None: unknown op
    config: OpQuantConfig | None  # the chosen candidate (base unless mixed precision picked another)
    float_output: bool  # the node produces a floating-point tensor
    fused_into: str | None = None  # set on inner nodes of a fused group: the group's last node
    # per-node error methods ("activation" / "weights" -> ErrorMethod) from manual overrides
    error_methods: dict = field(default_factory=dict)
    # bit-widths set by a manual override ("activation" / "weights"): mixed precision leaves them alone
    pinned: set = field(default_factory=set)

    @property
    def quantize_output(self) -> bool:
        return (self.config is not None and self.float_output and self.fused_into is None
                and self.config.enable_activation_quantization)


def annotation(node: fx.Node) -> Annotation | None:
    return node.meta.get(META_KEY)


def is_float_tensor(node: fx.Node) -> bool:
    """Whether shape propagation recorded a floating-point tensor output for ``node``."""
    tm = node.meta.get("tensor_meta")
    return tm is not None and hasattr(tm, "dtype") and tm.dtype.is_floating_point


def produces_float(node: fx.Node) -> bool:
    """Whether any output of ``node`` (a tensor, or tensors in a tuple/dict) is floating point."""

    def walk(meta: object) -> bool:
        if hasattr(meta, "dtype"):
            return meta.dtype.is_floating_point
        if isinstance(meta, (tuple, list)):
            return any(walk(m) for m in meta)
        if isinstance(meta, dict):
            return any(walk(m) for m in meta.values())
        return False

    return walk(node.meta.get("tensor_meta"))


def describe_target(node: fx.Node, gm: fx.GraphModule) -> str:
    """Human-readable op of a node (module class, function or method name)."""
    if node.op == "call_module":
        return type(gm.get_submodule(node.target)).__name__
    if node.op == "call_function":
        return getattr(node.target, "__name__", str(node.target))
    if node.op == "call_method":
        return f"Tensor.{node.target}"
    return node.op


def annotate(gm: fx.GraphModule, tpc: TargetPlatformCapabilities) -> list[fx.Node]:
    """Annotate every node of ``gm`` from ``tpc``.

    Returns the nodes of unknown ops that produce float tensors (left float);
    unknown ops on sizes, shapes and other non-tensors do not matter.
    """
    unknown = []
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            op = "Input"
        elif node.op.startswith("call_"):
            op = op_name(node, gm)
        else:
            continue
        if op is None:
            node.meta[META_KEY] = Annotation(None, None, None, is_float_tensor(node))
            if produces_float(node):  # tuples of tensors too (e.g. attention)
                unknown.append(node)
            continue
        options = tpc.options_for(op)
        node.meta[META_KEY] = Annotation(op, options, options.base, is_float_tensor(node))
    _fuse(gm, tpc)
    return unknown


def _fuse(gm: fx.GraphModule, tpc: TargetPlatformCapabilities) -> None:
    patterns = sorted((p.groups for p in tpc.fusing_patterns), key=len, reverse=True)
    fused: set[fx.Node] = set()
    for node in gm.graph.nodes:
        for groups in patterns:
            chain = _match_chain(node, groups, fused)
            if chain:
                for inner in chain[:-1]:
                    annotation(inner).fused_into = chain[-1].name
                fused.update(chain)
                break


def _match_chain(start: fx.Node, groups: tuple[tuple[str, ...], ...], fused: set[fx.Node]) -> list[fx.Node]:
    chain, node = [], start
    for i, group in enumerate(groups):
        ann = annotation(node)
        if node in fused or ann is None or ann.op not in group:
            return []
        chain.append(node)
        if i + 1 < len(groups):
            users = list(node.users)
            if len(users) != 1:
                return []
            node = users[0]
    return chain


def _postprocessing(node: fx.Node, gm: fx.GraphModule) -> fx.Node | None:
    """The detection post-processing node an output comes from (through field / item access), if any."""
    while isinstance(node, fx.Node):
        if node.op.startswith("call_") and op_name(node, gm) in POSTPROCESS_OPS:
            return node
        if not (node.op == "call_function" and node.target in (operator.getitem, getattr)):
            return None
        node = node.args[0]
    return None


def _network_outputs(source: fx.Node, gm: fx.GraphModule) -> list[fx.Node]:
    """The network tensors a post-processing node reads, through other post-processing (a box decode)."""
    found = []
    for node in source.all_input_nodes:
        if node.op == "get_attr":
            continue
        inner = _postprocessing(node, gm)
        found.extend(_network_outputs(inner, gm) if inner is not None else [node])
    return found


def measured_outputs(gm: fx.GraphModule) -> list | None:
    """What a float-vs-quantized distance on the model output is measured on, when not the output itself: for
    outputs of detection post-processing (NMS: a selection, labels, counts), the network tensors it reads
    (boxes and scores; an SSD's box codes where a post-processing box decode reads them: that op has no
    gradient, and the Hessian differentiates these tensors).  None when no output comes from post-processing."""
    out = next(n for n in gm.graph.nodes if n.op == "output")
    leaves = tree_leaves(out.args[0])
    sources = [_postprocessing(leaf, gm) for leaf in leaves]
    if not any(sources):
        return None
    measured: list = []
    for leaf, source in zip(leaves, sources, strict=True):
        for node in _network_outputs(source, gm) if source is not None else [leaf]:
            if not any(node is m for m in measured):
                measured.append(node)
    return measured  # boxes decoded by the network's own ops are measured as they are: continuous values


def measured_view(gm: fx.GraphModule) -> fx.GraphModule:
    """``gm`` itself, or (detection post-processing at its outputs) a GraphModule sharing its modules that
    returns the post-processing's inputs instead (:func:`measured_outputs`)."""
    measured = measured_outputs(gm)
    if measured is None:
        return gm
    return with_outputs(gm, [m.name for m in measured if isinstance(m, fx.Node)])
