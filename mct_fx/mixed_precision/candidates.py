"""Which nodes mixed precision may configure, and the frozen quantizers of each of their candidates.

A node is configurable when the target offers it candidates that differ in what
the node itself quantizes: its kernel (a Conv/Linear layer's weights) and/or
its output activation (only when the node's output is quantized: a node inside
a fused group leaves that to the group's last node).  Candidates that differ
only elsewhere collapse into one; activation widths that a consumer cannot read
are dropped; bit-widths a manual override set stay as they are.  The node's
current (base) configuration is always a candidate and comes first.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field, replace

from torch import Tensor, fx, nn

from mct_fx.config import QuantConfig
from mct_fx.graph_utils import attr_value
from mct_fx.meta import Role, quantizer_nodes_by_role
from mct_fx.passes.freeze import activation_freezer
from mct_fx.passes.insert_quantizers import SIGNEDNESS as _SIGNED
from mct_fx.passes.insert_quantizers import weight_quantizer
from mct_fx.quantizers.lut import LutActivationQuantizer
from mct_fx.quantizers.modules import ActivationQuantizer, FakeQuantizer, WeightQuantizer
from mct_fx.tpc.matching import annotation
from mct_fx.tpc.schema import OpQuantConfig
from mct_fx.tpc.vocabulary import LINEAR_OPS

__all__ = ["Configurable", "configurable_nodes", "AlternativeQuantizers"]


@dataclass
class Configurable:
    """One configurable node: its candidate configurations (base first) and what each changes."""

    node: str
    candidates: list[OpQuantConfig]
    weights: bool  # the choice changes the node's kernel quantizer
    activation: bool  # the choice changes the node's output quantizer
    # the module names of the node's quantizers that the choice swaps, by role
    targets: dict[Role, str] = field(default_factory=dict)
    # per candidate index: the frozen quantizers to use, by role; base: the graph's own
    quantizers: dict[int, dict[Role, FakeQuantizer]] = field(default_factory=dict)

    def key(self, config: OpQuantConfig) -> tuple:
        w = (config.kernel.method, config.kernel.n_bits, config.kernel.per_channel) if self.weights else None
        a = (config.activation_method, config.activation_n_bits, config.signedness) if self.activation else None
        return w, a

    def describe(self, index: int) -> str:
        """``W4``, ``A16``, ``W4A16``: the bit-widths that differ between this node's candidates."""
        c = self.candidates[index]
        w = len({(x.kernel.method, x.kernel.n_bits) for x in self.candidates}) > 1
        a = len({(x.activation_method, x.activation_n_bits) for x in self.candidates}) > 1
        method = c.kernel.method.value if c.kernel.method.is_lut else ""
        return (f"W{c.kernel.n_bits}{method}" if w else "") + (f"A{c.activation_n_bits}" if a else "")


def _kernel_quantized(gm: fx.GraphModule, node: fx.Node) -> bool:
    return (node.op == "call_function" and annotation(node).op in LINEAR_OPS and len(node.args) > 1
            and isinstance(node.args[1], fx.Node) and node.args[1].op == "call_module"
            and isinstance(gm.get_submodule(node.args[1].target), WeightQuantizer))


def _readable_by_consumers(node: fx.Node, bits: int) -> bool:
    for user in node.users:
        ann = annotation(user)
        if ann is None:  # the node's own quantizer: look past it
            if not _readable_by_consumers(user, bits):
                return False
        elif ann.config is not None and bits not in ann.config.supported_input_activation_n_bits:
            return False
    return True


def configurable_nodes(gm: fx.GraphModule) -> list[Configurable]:
    """The configurable nodes of a prepared ``gm`` (quantizers inserted), in graph order."""
    out = []
    own: dict[str, dict[Role, str]] = {}
    for q, record in quantizer_nodes_by_role(gm):
        own.setdefault(record.node, {})[record.role] = q.target
    for node in gm.graph.nodes:
        ann = annotation(node)
        if ann is None or ann.options is None or len(ann.options.candidates) < 2 or ann.config is None:
            continue
        weights = _kernel_quantized(gm, node) and ann.config.kernel.enabled and "weights" not in ann.pinned
        targets = own.get(node.name, {})
        activation = ann.quantize_output and Role.ACTIVATION in targets and "activation" not in ann.pinned
        if not (weights or activation):
            continue
        swapped = {role: targets[role] for role, on in ((Role.WEIGHT, weights), (Role.ACTIVATION, activation))
                   if on and role in targets}
        entry = Configurable(node.name, [], weights, activation, swapped)
        seen = set()
        for config in (ann.config, *ann.options.candidates):  # the current (base) one first
            if weights and not config.kernel.enabled:
                continue
            if activation and (not config.enable_activation_quantization
                               or not _readable_by_consumers(node, config.activation_n_bits)):
                continue
            key = entry.key(config)
            if key not in seen:
                seen.add(key)
                entry.candidates.append(_merged(ann.config, config, weights, activation))
        if len(entry.candidates) > 1:
            out.append(entry)
    return out


def _merged(base: OpQuantConfig, cand: OpQuantConfig, weights: bool, activation: bool) -> OpQuantConfig:
    """``base`` with what this node takes from ``cand`` (its kernel and/or its output activation)."""
    if weights and activation:
        return cand
    if weights:
        return replace(base, kernel=cand.kernel, simd_size=cand.simd_size)
    return replace(base, activation_method=cand.activation_method, activation_n_bits=cand.activation_n_bits,
                   signedness=cand.signedness)


class AlternativeQuantizers:
    """Copies of the observing activation quantizers, frozen at every alternative width once the graph is.

    Made after calibration and before :func:`freeze_quantizers`: the copies keep
    the histograms that freezing throws away.
    """

    def __init__(self, gm: fx.GraphModule, entries: list[Configurable]):
        self.gm = gm
        self.entries = entries
        self._observers: dict[str, ActivationQuantizer] = {}
        for e in entries:
            if e.activation:
                self._observers[e.node] = copy.deepcopy(gm.get_submodule(e.targets[Role.ACTIVATION]))

    def build(self, config: QuantConfig, importance: dict[str, Tensor] | None = None) -> None:
        """Freeze one quantizer per non-base candidate (weights from the tensors, activations from the copies).

        ``importance``: per-element kernel error weights by layer name, as for :func:`freeze_quantizers`.
        """
        freeze_activation = activation_freezer(self.gm, config)
        nodes = {n.name: n for n in self.gm.graph.nodes}
        for e in self.entries:
            node = nodes[e.node]
            for index, cand in enumerate(e.candidates[1:], start=1):
                modules: dict[Role, FakeQuantizer] = {}
                if e.weights:
                    qnode = node.args[1]
                    base: WeightQuantizer = self.gm.get_submodule(qnode.target)
                    weight = attr_value(self.gm, qnode.args[0])
                    q = weight_quantizer(cand.kernel, weight, base.axis if base.axis is not None else 0)
                    q.to(weight.device).freeze(weight, annotation(node).error_methods.get(
                        "weights", config.weights_error_method), config.lp_norm,
                        importance=(importance or {}).get(e.node))
                    modules[Role.WEIGHT] = q
                if e.activation:
                    observing = self._observers[e.node]
                    signed = _SIGNED[cand.signedness]
                    cls = LutActivationQuantizer if cand.activation_method.is_lut else ActivationQuantizer
                    q = cls(cand.activation_method, cand.activation_n_bits,
                            observing.signed if signed is None else signed).to(observing.scale.device)
                    q.observer = copy.deepcopy(observing.observer)
                    freeze_activation(e.targets[Role.ACTIVATION], q)
                    modules[Role.ACTIVATION] = q
                e.quantizers[index] = modules
        self._observers.clear()


def swap(gm: nn.Module, entry: Configurable, index: int) -> dict[str, nn.Module]:
    """Put candidate ``index``'s quantizers into ``gm``; returns the modules they replaced."""
    replaced = {}
    for role, module in entry.quantizers.get(index, {}).items():
        name = entry.targets[role]
        replaced[name] = getattr(gm, name)
        setattr(gm, name, module)
    return replaced


def unswap(gm: nn.Module, replaced: dict[str, nn.Module]) -> None:
    """Put back the modules :func:`swap` replaced."""
    for name, module in replaced.items():
        setattr(gm, name, module)
