"""Power-of-two alignment: rescale ``layer -> ReLU -> layers`` so a power-of-two grid lands on the best threshold.

A power-of-two activation grid can only take thresholds ``2^k``; the error-optimal
threshold of a tensor usually lies between two of them, and the grid then either
clips too much or wastes up to half its codes.  When the tensor is made by one
weighted layer through positively homogeneous ops (ReLU, LeakyReLU, max-pooling,
reshapes) and read only by weighted layers, multiplying the producer's kernel and
bias by ``f`` and the readers' kernels by ``1 / f`` keeps the float function and
scales the tensor by ``f``: choosing ``f`` so that the best unconstrained threshold
times ``f`` is a power of two gives the power-of-two grid that threshold's error.
The kernels' per-channel (or per-tensor) symmetric and uniform grids scale with
them, so weight quantization is unchanged; power-of-two kernels are left alone.

Runs after calibration, before freezing: the best threshold comes from the
observed histogram, which is rescaled with the tensor.  :func:`alignment_factors`
chooses the factors, :func:`apply_alignment` applies given factors (the
comparison report replays them on the float model).
"""

from __future__ import annotations

import math

import torch
from torch import fx

from mct_fx.config import QuantConfig
from mct_fx.graph_utils import LAYERS, SCALE_COMMUTING, attr_value, set_param
from mct_fx.meta import ALIGNMENT
from mct_fx.passes.freeze import error_method
from mct_fx.passes.shift_negative import shiftable_quantizers
from mct_fx.quantizers.clamp import BoundedReLU
from mct_fx.quantizers.modules import ActivationQuantizer, WeightQuantizer
from mct_fx.quantizers.params import QuantMethod
from mct_fx.quantizers.search import ErrorMethod, activation_grid
from mct_fx.tpc.vocabulary import op_name

__all__ = ["alignment_factors", "apply_alignment", "ALIGNMENT_KEY"]

ALIGNMENT_KEY = ALIGNMENT
_HOMOGENEOUS = ("ReLU", "LeakyReLU", "PReLU")  # f(a x) = a f(x) for a > 0
_SCALE_FREE = (QuantMethod.SYMMETRIC, QuantMethod.UNIFORM)
_MIN_GAIN = 1e-3  # factors this close to 1 are not worth a rewrite


def _name(node: fx.Node, gm: fx.GraphModule) -> str | None:
    return op_name(node, gm) if node.op.startswith("call_") else None


def _param(gm: fx.GraphModule, arg: object) -> tuple[fx.Node, WeightQuantizer | None] | None:
    """The ``get_attr`` node of a layer argument (through its quantizer) if only this layer reads it."""
    quant = None
    if isinstance(arg, fx.Node) and arg.op == "call_module":
        quant = gm.get_submodule(arg.target)
        if not isinstance(quant, WeightQuantizer) or len(arg.users) != 1:
            return None
        arg = arg.args[0]
    if not (isinstance(arg, fx.Node) and arg.op == "get_attr" and len(arg.users) == 1):
        return None
    if quant is not None and quant.method not in _SCALE_FREE:
        return None
    return arg, quant


def _weighted(node: fx.Node, gm: fx.GraphModule) -> bool:
    """A conv / linear whose kernel (and bias) only it reads, on scale-free grids."""
    if not (node.op == "call_function" and node.target in LAYERS and not node.kwargs and len(node.args) >= 2):
        return False
    bias = node.args[2] if len(node.args) > 2 else None
    return _param(gm, node.args[1]) is not None and (bias is None or _param(gm, bias) is not None)


def _producer(quant: fx.Node, gm: fx.GraphModule) -> fx.Node | None:
    """The weighted layer that makes the quantizer's input through single-use homogeneous ops."""
    node = quant.args[0] if quant.args else None
    while isinstance(node, fx.Node) and len(node.users) == 1:
        if _weighted(node, gm):
            return node
        if not node.args or not (_name(node, gm) in _HOMOGENEOUS + SCALE_COMMUTING or _bounded(node, gm) is not None):
            return None
        node = node.args[0]
    return None


def _readers(node: fx.Node, gm: fx.GraphModule) -> list[fx.Node] | None:
    """The layers every path from ``node`` reaches through scale-commuting ops (each reading it as input), or None."""
    if not node.users:
        return None
    out = []
    for user in node.users:
        if _weighted(user, gm) and user.args[0] is node and node not in user.args[1:]:
            out.append(user)
        elif _name(user, gm) in SCALE_COMMUTING and user.args and user.args[0] is node:
            below = _readers(user, gm)
            if below is None:
                return None
            out += below
        else:
            return None
    return out


def _best_threshold(quant: ActivationQuantizer, error: ErrorMethod, p: float, z_threshold: float) -> float | None:
    """The error-optimal threshold of a symmetric grid on the observed histogram, outliers filtered as freezing
    does (None: nothing observed)."""
    obs = quant.observer
    if obs.empty or obs.offset:
        return None
    centres, counts = obs.centres_and_counts()
    scale, _, signed = activation_grid(centres, counts, obs.min, obs.max, QuantMethod.SYMMETRIC, quant.n_bits,
                                       quant.signed, error, p, z_threshold=z_threshold)
    return float(scale[0]) * 2 ** (quant.n_bits - int(signed))


def alignment_factors(gm: fx.GraphModule, config: QuantConfig) -> dict[str, float]:
    """Per eligible power-of-two activation quantizer node: the factor that puts its best threshold on ``2^k``.

    The threshold is searched with the node's activation error method and the
    config's outlier filter; quantizers that shift-negative correction may give a
    shifted grid are left alone.
    """
    shiftable = shiftable_quantizers(gm) if config.shift_negative_correction else set()
    factors = {}
    nodes = {n.name: n for n in gm.graph.nodes}
    for node in gm.graph.nodes:
        if node.op != "call_module":
            continue
        quant = gm.get_submodule(node.target)
        if not (isinstance(quant, ActivationQuantizer) and quant.method is QuantMethod.POWER_OF_TWO
                and quant.mode == "observe"):
            continue
        if node.target in shiftable or _producer(node, gm) is None or _readers(node, gm) is None:
            continue
        error = error_method(nodes, node, "activation", config.activation_error_method)
        threshold = _best_threshold(quant, error, config.lp_norm, config.z_threshold)
        if threshold is None or not threshold > 0:
            continue
        factor = 2.0 ** round(math.log2(threshold)) / threshold
        if abs(factor - 1) > _MIN_GAIN:
            factors[node.name] = factor
    return factors


def apply_alignment(gm: fx.GraphModule, factors: dict[str, float]) -> dict[str, float]:
    """Scale each named quantizer's producer by its factor and its readers by the inverse, in place.

    Observed histograms move with the tensor.  Returns the factor by which each
    reader layer's input was scaled (its recorded input statistics must follow).
    """
    nodes = {n.name: n for n in gm.graph.nodes}
    readers_scaled = {}
    for name, factor in factors.items():
        node = nodes.get(name)
        producer = _producer(node, gm) if node is not None else None
        readers = _readers(node, gm) if node is not None else None
        if producer is None or readers is None:
            raise ValueError(f"power-of-two alignment: node {name!r} is not a layer -> quantizer -> layers chain")
        with torch.no_grad():
            for op in _path(node, producer):
                clamp = _bounded(op, gm)
                if clamp is not None:
                    clamp.bound.mul_(factor)
            for arg in producer.args[1:3]:
                if arg is not None:
                    _scale_param(gm, arg, factor)
            for reader in set(readers):
                _scale_param(gm, reader.args[1], 1 / factor)
                readers_scaled[reader.name] = factor
        quant = gm.get_submodule(node.target)
        if quant.mode == "observe" and not quant.observer.empty:
            quant.observer.scale(factor)
    return readers_scaled


def _bounded(node: fx.Node, gm: fx.GraphModule) -> BoundedReLU | None:
    """The :class:`BoundedReLU` a node calls (its bound is state, so it can scale with its input)."""
    if node.op != "call_module":
        return None
    module = gm.get_submodule(node.target)
    return module if isinstance(module, BoundedReLU) else None


def _path(quant: fx.Node, producer: fx.Node) -> list[fx.Node]:
    """The ops between ``producer`` and the quantizer node."""
    out, node = [], quant.args[0]
    while node is not producer:
        out.append(node)
        node = node.args[0]
    return out


def _scale_param(gm: fx.GraphModule, arg: fx.Node, factor: float) -> None:
    attr, _ = _param(gm, arg)
    t = attr_value(gm, attr)
    set_param(gm, attr.target, t.detach() * factor, t)
