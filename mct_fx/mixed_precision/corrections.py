"""Weight-error corrections while sensitivities are measured: each candidate judged as PTQ will correct it.

PTQ corrects the final model's layers for their weight errors (bias correction or
second-moment correction, :mod:`mct_fx.passes.weight_correction`).  A candidate's
sensitivity is measured with its layer corrected the same way for its own grid,
and every other layer corrected for its base grid, so the search ranks the errors
that remain after correction.  That matters below 8 bits: a 2-bit kernel that
mostly shrinks a layer's output (a gain error) looks expensive uncorrected and
cheap after second-moment correction.

Which one: :func:`expected_correction`; if the chosen model then keeps the other
("auto" compares both on the calibration images), PTQ undoes the choice and
searches again under that one.  Both classes change the graph's parameters in
place (the sensitivity probe shares them) and put the original values back in
:meth:`restore`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch
from torch import Tensor, fx

from mct_fx.config import QuantConfig
from mct_fx.data import ModelInputs
from mct_fx.graph_utils import attr_value, layer_bias
from mct_fx.meta import Role
from mct_fx.mixed_precision.candidates import Configurable
from mct_fx.passes.bias_correction import correct_biases, output_shift
from mct_fx.passes.layer_inputs import quantized_layers
from mct_fx.passes.second_moment import correctable_layers, moment_fix, output_moments
from mct_fx.passes.weight_correction import BIAS, SECOND_MOMENT
from mct_fx.quantizers.modules import WeightQuantizer
from mct_fx.resources import weight_bits

__all__ = ["CandidateCorrection", "CandidateBiases", "CandidateMoments", "candidate_correction",
           "expected_correction"]


class CandidateCorrection(Protocol):
    """Sets a layer's correction for the grid the sensitivity evaluator is about to measure."""

    def use_candidate(self, entry: Configurable, index: int) -> None: ...

    def use_base(self, entry: Configurable) -> None: ...

    def restore(self) -> None: ...


def expected_correction(config: QuantConfig, entries: Sequence[Configurable]) -> str:
    """The correction PTQ is expected to keep on the chosen model: second-moment when it is on (``True``) or
    may be kept (``"auto"`` with some kernel candidate below 8 bits) and OPTQ is off, bias correction otherwise."""
    mode = config.weights_second_moment_correction
    if config.optq is not None:  # OPTQ rounding is followed by bias correction, never the second-moment one
        return BIAS
    low_bit = any(weight_bits(c) < 8 for e in entries for c in e.candidates)
    return SECOND_MOMENT if mode is True or (mode == "auto" and low_bit) else BIAS


def candidate_correction(kind: str, gm: fx.GraphModule, entries: Sequence[Configurable],
                         images: Sequence[ModelInputs], input_means: dict[str, Tensor],
                         config: QuantConfig) -> CandidateCorrection:
    """``kind`` (``"second-moment"`` or ``"bias"``) applied per candidate; bias correction is "none" without
    ``input_means``."""
    if kind == SECOND_MOMENT:
        return CandidateMoments(gm, entries, images)
    if kind == BIAS:
        return CandidateBiases(gm, input_means, config)
    raise ValueError(f"correction: expected {SECOND_MOMENT!r} or {BIAS!r}, got {kind!r}")


class CandidateBiases:
    """Bias correction: each layer's bias as its own weights' grid needs it (from its input's mean)."""

    def __init__(self, gm: fx.GraphModule, input_means: dict[str, Tensor], config: QuantConfig):
        self.gm, self.means = gm, input_means
        self.layers = {layer.name: (layer, qnode) for layer, qnode, _ in quantized_layers(gm)}
        self.original = {name: b.detach().clone() for name, b in self._biases().items()}
        if input_means:
            correct_biases(gm, input_means, config.weights_error_method, config.lp_norm)
        self.base = {name: b.detach().clone() for name, b in self._biases().items()}

    def _bias(self, name: str) -> Tensor | None:
        return layer_bias(self.gm, self.layers[name][0])

    def _biases(self) -> dict[str, Tensor]:
        return {name: b for name in self.layers if (b := self._bias(name)) is not None}

    def use_candidate(self, entry: Configurable, index: int) -> None:
        q = entry.quantizers.get(index, {}).get(Role.WEIGHT)
        bias, mean = self._bias(entry.node) if entry.node in self.layers else None, self.means.get(entry.node)
        if q is None or bias is None or mean is None:
            return
        layer, qnode = self.layers[entry.node]
        weight = attr_value(self.gm, qnode.args[0])
        with torch.no_grad():
            delta = (q(weight) - weight).double()
            bias.copy_(self.original[entry.node] - output_shift(layer, delta, mean.double()).to(bias.dtype))

    def use_base(self, entry: Configurable) -> None:
        bias = self._bias(entry.node) if entry.node in self.layers else None
        if bias is not None:
            with torch.no_grad():
                bias.copy_(self.base[entry.node])

    def restore(self) -> None:
        with torch.no_grad():
            for name, bias in self._biases().items():
                bias.copy_(self.original[name])


class _Fix:
    """One layer's second-moment fix per grid: ``index -> (quantizer, its scale, r, bias)``."""

    def __init__(self, weight: Tensor, bias: Tensor):
        self.weight, self.bias = weight, bias
        self.weight0, self.bias0 = weight.detach().clone(), bias.detach().clone()
        self.grids: dict[int, tuple[WeightQuantizer, Tensor, Tensor, Tensor]] = {}

    def use(self, index: int) -> None:
        q, scale, r, bias = self.grids[index]
        shape = (-1,) + (1,) * (self.weight.dim() - 1)
        with torch.no_grad():
            self.weight.copy_(self.weight0 * r.reshape(shape).to(self.weight.dtype))
            self.bias.copy_(bias.to(self.bias.dtype))
        q.scale = scale * r.to(scale.device, scale.dtype)

    def release(self, index: int) -> None:
        q, scale, _, _ = self.grids[index]
        q.scale = scale

    def restore(self) -> None:
        for index in self.grids:
            self.release(index)
        with torch.no_grad():
            self.weight.copy_(self.weight0)
            self.bias.copy_(self.bias0)


class CandidateMoments:
    """Second-moment correction: each layer's output, with each of its grids, given the float per-channel
    mean and variance measured on the sensitivity images (layers without a bias stay uncorrected)."""

    def __init__(self, gm: fx.GraphModule, entries: Sequence[Configurable], images: Sequence[ModelInputs]):
        by_node = {e.node: e for e in entries}
        self.fixes: dict[str, _Fix] = {}
        weights: dict[fx.Node, list[Tensor]] = {}
        grids: dict[fx.Node, list[tuple[int, WeightQuantizer]]] = {}
        for layer, qnode, q in correctable_layers(gm):
            bias = layer_bias(gm, layer)
            if bias is None:
                continue
            fix = self.fixes[layer.name] = _Fix(attr_value(gm, qnode.args[0]), bias)
            entry = by_node.get(layer.name)
            others = [] if entry is None else [(i, entry.quantizers.get(i, {}).get(Role.WEIGHT))
                                               for i in range(1, len(entry.candidates))]
            grids[layer] = [(0, q)] + [(i, c) for i, c in others if c is not None and c.axis == 0 and c.affine]
            with torch.no_grad():
                weights[layer] = [fix.weight0] + [c(fix.weight0) for _, c in grids[layer]]
        for layer, (mean, var) in output_moments(gm, weights, images).items():
            fix = self.fixes[layer.name]
            for k, (index, q) in enumerate(grids[layer], start=1):
                r, bias = moment_fix(mean[0], var[0], mean[k], var[k], fix.bias0)
                fix.grids[index] = (q, q.scale.detach().clone(), r, bias)
        self.fixes = {name: fix for name, fix in self.fixes.items() if fix.grids}
        for fix in self.fixes.values():
            fix.use(0)

    def use_candidate(self, entry: Configurable, index: int) -> None:
        fix = self.fixes.get(entry.node)
        if fix is not None and index in fix.grids:
            fix.release(0)
            fix.use(index)

    def use_base(self, entry: Configurable) -> None:
        fix = self.fixes.get(entry.node)
        if fix is not None:
            for index in fix.grids:
                fix.release(index)
            fix.use(0)

    def restore(self) -> None:
        for fix in self.fixes.values():
            fix.restore()
