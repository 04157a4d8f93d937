"""Resource utilization: weights memory, activation memory, BOPS, read from an annotated graph.

Every figure is per input sample (the example batch's size divides out) and in
bytes (BOPS: bit operations).  The costs are linear in each node's chosen
quantization configuration, which is what lets the mixed-precision search
express them as integer-program constraints: :class:`CostModel` keeps the
terms, :meth:`CostModel.evaluate` sums them for one choice.

* weights memory: every parameter the graph reads, quantized kernels/biases at
  their bit-width, everything else at 32 bits;
* activation memory: the peak, over the graph's execution order, of the tensors
  alive at the same time (from the step that produces a tensor to its last
  reader); views (reshape, flatten, dropout, ...) and quantizers share their
  input's storage, the inner outputs of a fused group are never stored, an
  unquantized output of a known op keeps its input's width, an unknown op's is float;
* BOPS: per Conv/ConvTranspose/Linear layer, MACs x weight bits x input activation bits.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, fields

import torch
from torch import fx, nn

from mct_fx.graph_utils import TRANSPOSED_CONVS, attr_value, param_source
from mct_fx.tpc.matching import annotation
from mct_fx.tpc.schema import OpQuantConfig
from mct_fx.tpc.vocabulary import LINEAR_OPS

__all__ = ["ResourceUtilization", "CostModel", "float_weights_memory", "weight_bits",
           "activation_bits", "tensor_metas", "per_sample_numel", "example_batch_size"]

FLOAT_BITS = 32
# ops whose output is a view of their (first) input: no storage of their own
VIEW_OPS = ("Flatten", "Reshape", "Squeeze", "Unsqueeze", "Permute", "Transpose", "Expand", "GetItem",
            "SplitChunk", "Unstack", "Dropout", "Identity", "Cast")


@dataclass(frozen=True)
class ResourceUtilization:
    """Bytes of weights, peak bytes of activations, their sum, and bit operations (per sample).

    As a mixed-precision target, a field left ``None`` is not constrained.
    """

    weights_memory: float | None = None
    activation_memory: float | None = None
    total_memory: float | None = None
    bops: float | None = None

    def __post_init__(self):
        for f in fields(self):
            value = getattr(self, f.name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                      or not value >= 0 or math.isnan(value)):
                raise ValueError(f"ResourceUtilization.{f.name}: expected a non-negative number of "
                                 f"{'bit operations' if f.name == 'bops' else 'bytes'} or None, got {value!r}")

    def items(self) -> list[tuple[str, float]]:
        """The set fields as ``(name, value)``."""
        return [(f.name, getattr(self, f.name)) for f in fields(self) if getattr(self, f.name) is not None]

    def exceeds(self, target: ResourceUtilization) -> list[str]:
        """Names of the fields where this utilization is above ``target``'s bound."""
        return [name for name, bound in target.items() if getattr(self, name) > bound * (1 + 1e-9)]

    def __str__(self) -> str:
        def fmt(name: str, v: float) -> str:
            return f"{name}={v / 1e9:.3g} GBOPs" if name == "bops" else f"{name}={v / 1024:.1f} KiB"
        return ", ".join(fmt(n, v) for n, v in self.items()) or "unconstrained"


def weight_bits(config: OpQuantConfig | None, attribute: str = "kernel") -> int:
    """Bits one element of a layer's kernel (or bias) takes with ``config``."""
    attr = getattr(config, attribute, None) if config is not None else None
    return attr.n_bits if attr is not None and attr.enabled else FLOAT_BITS


def activation_bits(config: OpQuantConfig | None) -> int:
    return config.activation_n_bits if config is not None and config.enable_activation_quantization else FLOAT_BITS


@dataclass(frozen=True)
class WeightTerm:
    numel: int
    node: str | None  # its bits come from this node's config (None: float)
    attribute: str = "kernel"


@dataclass(frozen=True)
class TensorTerm:
    numel: int
    node: str | None  # its bits are this node's activation bits (None: float)
    start: int  # index of the producing step
    end: int  # index of the last reading step


@dataclass(frozen=True)
class LayerTerm:
    node: str  # the layer (weight bits)
    macs: int
    input_node: str | None  # the activation bits of its input


class CostModel:
    """The resource terms of an annotated GraphModule (shapes from ``node.meta["tensor_meta"]``)."""

    def __init__(self, gm: fx.GraphModule):
        self.gm = gm
        self.order = [n for n in gm.graph.nodes]
        self._index = {n: i for i, n in enumerate(self.order)}
        self.batch = example_batch_size(gm)
        self.weights = self._weight_terms()
        self.tensors = self._tensor_terms()
        self.layers = self._layer_terms()
        self.steps = sorted({t.start for t in self.tensors})

    def configs(self) -> dict[str, OpQuantConfig | None]:
        """Every annotated node's current configuration."""
        return {n.name: annotation(n).config for n in self.order if annotation(n) is not None}

    def evaluate(self, choice: Mapping[str, OpQuantConfig] | None = None) -> ResourceUtilization:
        """Utilization with the annotations' configurations, replaced by ``choice`` where it has a node."""
        configs = {**self.configs(), **(choice or {})}
        w = sum(t.numel * weight_bits(configs.get(t.node), t.attribute) for t in self.weights) / 8
        live = [0.0] * len(self.order)
        for t in self.tensors:
            nbytes = t.numel * activation_bits(configs.get(t.node)) / 8
            for s in range(t.start, t.end + 1):
                live[s] += nbytes
        act = max(live, default=0.0)
        bops = sum(t.macs * weight_bits(configs.get(t.node)) * activation_bits(configs.get(t.input_node))
                   for t in self.layers)
        return ResourceUtilization(weights_memory=w, activation_memory=act, total_memory=w + act, bops=bops)

    def live_at(self, step: int) -> list[TensorTerm]:
        return [t for t in self.tensors if t.start <= step <= t.end]

    # -- building the terms -------------------------------------------------------------------

    def _weight_terms(self) -> list[WeightTerm]:
        bits_from: dict[str, tuple[str, str]] = {}
        for node in self.order:
            ann = annotation(node)
            if node.op != "call_function" or ann is None or ann.op not in LINEAR_OPS:
                continue
            for index, attribute in ((1, "kernel"), (2, "bias")):
                src = param_source(node.args[index]) if len(node.args) > index else None
                if isinstance(src, fx.Node) and src.op == "get_attr":
                    bits_from.setdefault(src.target, (node.name, attribute))
        terms, seen = [], set()
        for node in self.order:
            value = attr_value(self.gm, node) if node.op == "get_attr" else None
            if not isinstance(value, torch.Tensor) or not value.is_floating_point() or node.target in seen:
                continue
            seen.add(node.target)
            owner, attribute = bits_from.get(node.target, (None, "kernel"))
            terms.append(WeightTerm(value.numel(), owner, attribute))
        return terms

    def _storage(self, node: fx.Node) -> fx.Node:
        """The node whose stored tensor ``node``'s value is (through quantizers and views)."""
        while True:
            ann = annotation(node)
            is_quantizer = node.op == "call_module" and ann is None and node.args and isinstance(node.args[0],
                                                                                                 fx.Node)
            if is_quantizer or (ann is not None and ann.op in VIEW_OPS and node.args
                                and isinstance(node.args[0], fx.Node)):
                node = node.args[0]
                continue
            return node

    def _bits_node(self, node: fx.Node) -> str | None:
        """The node whose activation bits give the width of ``node``'s stored output (None: float)."""
        seen = set()
        while node not in seen:
            seen.add(node)
            ann = annotation(node)
            if ann is None or ann.config is None:
                return None
            if ann.quantize_output:
                return node.name
            inputs = [a for a in node.all_input_nodes if produces_tensor(a)]
            if ann.config.enable_activation_quantization or not inputs:
                return None  # float output (e.g. a quantized op with quantization turned off)
            node = self._storage(inputs[0])  # carries its input's grid (max-pool, padding, ...)
        return None

    def _tensor_terms(self) -> list[TensorTerm]:
        names = {n.name: n for n in self.order}
        last_read: dict[fx.Node, int] = {}
        for node in self.order:
            ann = annotation(node)
            # a fused group computes as one op: its inputs stay alive until its output exists
            reader = names[ann.fused_into] if ann is not None and ann.fused_into else node
            step = len(self.order) - 1 if node.op == "output" else self._index[reader]
            for arg in node.all_input_nodes:
                storage = self._storage(arg)
                last_read[storage] = max(last_read.get(storage, -1), step)
        terms = []
        for node in self.order:
            ann = annotation(node)
            if node.op not in ("placeholder", "call_function", "call_method", "call_module") or ann is None:
                continue
            if ann.fused_into is not None or ann.op in VIEW_OPS or self._storage(node) is not node:
                continue
            numel = sum(per_sample_numel(tm, self.batch) for tm in tensor_metas(node.meta.get("tensor_meta")))
            if numel == 0 or node not in last_read:
                continue
            terms.append(TensorTerm(numel, self._bits_node(node), self._index[node], last_read[node]))
        return terms

    def _layer_terms(self) -> list[LayerTerm]:
        terms = []
        for node in self.order:
            ann = annotation(node)
            if node.op != "call_function" or ann is None or ann.op not in LINEAR_OPS:
                continue
            weight = attr_value(self.gm, param_source(node.args[1]))
            x = node.args[0]
            if weight is None or not isinstance(x, fx.Node):
                continue
            if node.target in TRANSPOSED_CONVS:
                macs = per_sample_numel(x.meta.get("tensor_meta"), self.batch) * weight.numel() // weight.shape[0]
            elif ann.op == "FullyConnected":
                macs = per_sample_numel(node.meta.get("tensor_meta"), self.batch) * weight.shape[-1]
            else:
                macs = per_sample_numel(node.meta.get("tensor_meta"), self.batch) * weight.numel() // weight.shape[0]
            terms.append(LayerTerm(node.name, int(macs), self._bits_node(self._storage(x))))
        return terms


def produces_tensor(node: fx.Node) -> bool:
    return any(True for _ in tensor_metas(node.meta.get("tensor_meta")))


def tensor_metas(meta: object):
    if hasattr(meta, "dtype") and hasattr(meta, "shape"):
        if meta.dtype.is_floating_point:
            yield meta
    elif isinstance(meta, (tuple, list)):
        for m in meta:
            yield from tensor_metas(m)
    elif isinstance(meta, dict):
        for m in meta.values():
            yield from tensor_metas(m)


def example_batch_size(gm: fx.GraphModule) -> int:
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            tm = node.meta.get("tensor_meta")
            if hasattr(tm, "shape") and len(tm.shape) > 0:
                return int(tm.shape[0])
    return 1


def per_sample_numel(tm: object, batch: int) -> int:
    if not hasattr(tm, "shape"):
        return 0
    numel = math.prod(tm.shape)
    return numel // batch if len(tm.shape) > 0 and tm.shape[0] == batch and batch > 0 else numel


def float_weights_memory(model: nn.Module) -> int:
    """Bytes of ``model``'s parameters in float32 (what a weights budget fraction is a fraction of)."""
    return 4 * sum(p.numel() for p in model.parameters())
