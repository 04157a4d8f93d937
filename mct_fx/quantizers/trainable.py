"""Trainable quantization pieces for GPTQ and QAT: learned rounding, gradual activation quantization.

* :func:`ste_round` / :func:`scale_grad`: rounding with a straight-through
  gradient, and LSQ's gradient scaling (value unchanged, gradient times ``g``);
* :class:`SoftRounding`: AdaRound's learned rounding on a frozen weight grid:
  each weight is ``floor(w / s) + h`` steps with ``h`` a rectified sigmoid of a
  free variable, pushed to 0 or 1 by :meth:`SoftRounding.regularization`;
  the hard path uses ``h = [alpha >= 0]``;
* :class:`STERounding`: the alternative: ``round(w / s + delta)`` with
  ``delta`` in ``[-1, 1]`` steps learned through a straight-through round;
* :class:`GradualQuantizer`: ``x + f * (q(x) - x)``, the fraction ``f`` raised
  from 0 to 1 during GPTQ so the student meets quantized activations gradually.

The rounding modules replace a layer's :class:`~mct_fx.quantizers.WeightQuantizer`
while GPTQ trains and give back the on-grid weight at the end (:meth:`hardened`);
both may also learn the grid's scale (dequantization side only, the integer
codes come from the frozen grid), for non-power-of-two schemes.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["ste_round", "scale_grad", "SoftRounding", "STERounding", "GradualQuantizer", "per_axis"]

GAMMA, ZETA = -0.1, 1.1  # stretch of the rectified sigmoid (AdaRound), so h reaches 0 and 1 exactly


def ste_round(x: Tensor) -> Tensor:
    """``round(x)`` (half to even) forward, identity gradient."""
    return x + (torch.round(x) - x).detach()


def scale_grad(x: Tensor, g: float) -> Tensor:
    """``x`` forward, gradient multiplied by ``g``."""
    scaled = x * g
    return (x - scaled).detach() + scaled


def per_axis(p: Tensor, like: Tensor, axis: int | None) -> Tensor:
    """A per-channel parameter shaped to broadcast along ``axis`` of ``like`` (scalars stay scalars)."""
    if axis is None or p.numel() == 1:
        return p.reshape(())
    shape = [1] * like.dim()
    shape[axis] = -1
    return p.reshape(shape)


class _LearnedRounding(nn.Module):
    """A frozen weight grid (scale, zero point, integer range, axis) whose rounding is learned."""

    def __init__(self, quantizer: nn.Module, weight: Tensor, learn_scale: bool = False):
        super().__init__()
        self.axis, self.qmin, self.qmax = quantizer.axis, quantizer.qmin, quantizer.qmax
        w = weight.detach().float()
        scale = per_axis(quantizer.scale.float(), w, self.axis)
        self.register_buffer("zero_point", per_axis(quantizer.zero_point.float(), w, self.axis).clone())
        if learn_scale:
            self.scale = nn.Parameter(scale.clone())
        else:
            self.register_buffer("scale", scale.clone())
        self.hard = False
        self._init_codes(w / scale)  # the weight in steps of the frozen grid

    def _init_codes(self, steps: Tensor) -> None:
        raise NotImplementedError

    def _codes(self) -> Tensor:
        raise NotImplementedError

    def _dequantized(self) -> Tensor:
        q = torch.clamp(self._codes() + self.zero_point, self.qmin, self.qmax)
        return (q - self.zero_point) * self.scale

    def forward(self, w: Tensor) -> Tensor:  # the float weight flows in only for its dtype: the codes hold it
        return self._dequantized().to(w.dtype)

    def regularization(self, beta: float) -> Tensor:
        return self.zero_point.new_zeros(())

    @torch.no_grad()
    def hardened(self) -> tuple[Tensor, Tensor]:
        """The on-grid weight with the rounding made hard, and the grid's scale (flat, per channel)."""
        hard, self.hard = self.hard, True
        try:
            weight = self._dequantized()
        finally:
            self.hard = hard
        return weight, self.scale.detach().reshape(-1).clone()


class SoftRounding(_LearnedRounding):
    """AdaRound learned rounding (see the module docstring); starts at ``h = frac(w / s)``."""

    def _init_codes(self, steps: Tensor) -> None:
        floor = torch.floor(steps)
        rest = (steps - floor).clamp(0, 1)
        self.register_buffer("floor", floor)
        self.alpha = nn.Parameter(-torch.log((ZETA - GAMMA) / (rest - GAMMA) - 1))

    def soft_targets(self) -> Tensor:
        return torch.clamp(torch.sigmoid(self.alpha) * (ZETA - GAMMA) + GAMMA, 0, 1)

    def _codes(self) -> Tensor:
        h = (self.alpha >= 0).to(self.floor.dtype) if self.hard else self.soft_targets()
        return self.floor + h

    def regularization(self, beta: float) -> Tensor:
        """``sum(1 - |2h - 1| ** beta)``: 0 when every ``h`` is 0 or 1."""
        return (1 - (2 * self.soft_targets() - 1).abs().pow(beta)).sum()


class STERounding(_LearnedRounding):
    """Learned offset ``delta`` (clamped to one step either way) before a straight-through round."""

    def _init_codes(self, steps: Tensor) -> None:
        self.register_buffer("steps", steps)
        self.delta = nn.Parameter(torch.zeros_like(steps))

    def _codes(self) -> Tensor:
        return ste_round(self.steps + self.delta.clamp(-1, 1))


class GradualQuantizer(nn.Module):
    """``x + fraction * (q(x) - x)``: ``q`` only partly applied while ``fraction`` < 1."""

    def __init__(self, quantizer: nn.Module):
        super().__init__()
        self.quantizer = quantizer
        self.register_buffer("fraction", torch.zeros(()))

    def forward(self, x: Tensor) -> Tensor:
        return x + self.fraction.to(x.dtype) * (self.quantizer(x) - x)
