"""Graph meta: every key mct_fx writes into ``GraphModule.meta`` / ``Node.meta``, and the quantizer-role record.

One definition each, so that no module retypes a key as a string literal.  A
quantizer node carries a :class:`QuantizerRole` (which node it quantizes, in
which role); the helpers below find a node's quantizer by role, so no code
learns a role by parsing module names.
"""

from __future__ import annotations

import enum
from collections.abc import Iterator
from dataclasses import dataclass

from torch import fx, nn

__all__ = ["ANNOTATION", "QUANTIZER", "CONFIG", "PREPARATION", "SUMMARY", "CORRECTION", "ALIGNMENT", "GPTQ", "OPTQ",
           "QAT", "PRUNING", "Role", "QuantizerRole", "role_of", "quantized_node", "quantizer_nodes_by_role",
           "quantizer_node", "quantizer_module", "quantizer_name"]

# Node.meta
ANNOTATION = "mct_fx"  # tpc.matching.Annotation: what the target says about the node
QUANTIZER = "mct_fx.quantizes"  # on quantizer nodes: their QuantizerRole
# GraphModule.meta
CONFIG = "mct_fx.config"  # the QuantConfig a model was quantized with (analyses re-prepare with it)
PREPARATION = "mct_fx.preparation"  # prepare.Preparation: the target and what tracing needed
SUMMARY = "mct_fx.summary"  # quant_summary.QuantSummary
CORRECTION = "mct_fx.weight_correction"  # which weight-error correction the model kept
ALIGNMENT = "mct_fx.pot_alignment"  # power-of-two alignment factors a float reference must replay
GPTQ = "mct_fx.gptq"  # gptq.GPTQReport
OPTQ = "mct_fx.optq"  # optq.OPTQReport
QAT = "mct_fx.qat"  # qat.QATConfig, until qat_finalize
PRUNING = "mct_fx.pruning"  # pruning.PruningInfo


class Role(str, enum.Enum):
    """What a quantizer quantizes of its node; the value is the module-name suffix ``<node>_<value>_quant``."""

    WEIGHT = "weight"
    BIAS = "bias"
    ACTIVATION = "act"


@dataclass(frozen=True)
class QuantizerRole:
    """The record on a quantizer node: the node it serves and in which role."""

    node: str
    role: Role


def quantizer_name(node: str, role: Role) -> str:
    """The module name a quantizer of ``node`` in ``role`` is inserted under (used once, at insertion)."""
    return f"{node}_{role.value}_quant"


def role_of(node: fx.Node) -> QuantizerRole | None:
    """The record of a quantizer node; None for any other node."""
    return node.meta.get(QUANTIZER) if node.op == "call_module" else None


def quantized_node(node: fx.Node) -> str | None:
    """The name of the node a quantizer node quantizes; None for any other node."""
    record = role_of(node)
    return record.node if record is not None else None


def quantizer_nodes_by_role(gm: fx.GraphModule, role: Role | None = None) -> Iterator[tuple[fx.Node, QuantizerRole]]:
    """Every quantizer node of ``gm`` (in ``role`` when given) with its record, in graph order."""
    for node in gm.graph.nodes:
        record = role_of(node)
        if record is not None and (role is None or record.role is role):
            yield node, record


def quantizer_node(gm: fx.GraphModule, node: str, role: Role) -> fx.Node | None:
    """The quantizer node serving ``node`` in ``role``; None when it has none."""
    return next((q for q, record in quantizer_nodes_by_role(gm, role) if record.node == node), None)


def quantizer_module(gm: fx.GraphModule, node: str, role: Role) -> nn.Module | None:
    """The quantizer module serving ``node`` in ``role``; None when it has none."""
    q = quantizer_node(gm, node, role)
    return gm.get_submodule(q.target) if q is not None else None
