"""Quantization parameters of the uniform schemes, as pure tensor functions.

A scheme is turned into the affine parameters the fake-quantize op takes
(``scale``, integer ``zero_point``, integer range ``qmin..qmax``):

* power-of-two (POT): symmetric around zero with a threshold ``2**k``;
* symmetric: symmetric around zero with any positive threshold;
* uniform: an asymmetric range ``[lo, hi]``, widened to contain 0 so that zero
  is exactly representable (an integer zero point).

Signed symmetric/POT use ``[-2**(n-1), 2**(n-1)-1]`` with ``scale = t / 2**(n-1)``;
unsigned use ``[0, 2**n - 1]`` with ``scale = t / 2**n``; uniform always uses
``[0, 2**n - 1]``.  Every function is vectorised over leading dimensions
(per-channel and per-candidate parameters come out of one call).
"""

from __future__ import annotations

import enum

import torch
from torch import Tensor

__all__ = [
    "QuantMethod",
    "int_range",
    "pot_threshold",
    "symmetric_params",
    "uniform_params",
    "shift_negative_params",
    "MIN_THRESHOLD",
    "LUT_VALUE_BITS",
    "MAX_LUT_BITS",
]

# Thresholds below this are treated as this (all-zero tensors/channels stay finite).
MIN_THRESHOLD = 2.0**-24
# Look-up-table entries are 8-bit integers (in threshold units): indices of up to 7 bits make sense.
LUT_VALUE_BITS = 8
MAX_LUT_BITS = LUT_VALUE_BITS - 1


class QuantMethod(str, enum.Enum):
    """How a tensor's quantization grid is chosen."""

    POWER_OF_TWO = "power_of_two"
    SYMMETRIC = "symmetric"
    UNIFORM = "uniform"
    # non-uniform: k-means centres times a power-of-two / symmetric threshold (see mct_fx.quantizers.lut)
    LUT_POT = "lut_pot"
    LUT_SYMMETRIC = "lut_symmetric"

    @property
    def symmetric_grid(self) -> bool:
        """A uniform grid symmetric around zero (power-of-two or symmetric threshold)."""
        return self in (QuantMethod.POWER_OF_TWO, QuantMethod.SYMMETRIC)

    @property
    def is_lut(self) -> bool:
        return self in (QuantMethod.LUT_POT, QuantMethod.LUT_SYMMETRIC)


def int_range(n_bits: int, signed: bool) -> tuple[int, int]:
    """Integer code range of an ``n_bits`` grid."""
    if not 2 <= n_bits <= 16:
        raise ValueError(f"n_bits must be in 2..16, got {n_bits}")
    if signed:
        return -(2 ** (n_bits - 1)), 2 ** (n_bits - 1) - 1
    return 0, 2**n_bits - 1


def pot_threshold(t: Tensor) -> Tensor:
    """Smallest power of two >= ``t`` (elementwise)."""
    t = torch.clamp(t.float(), min=MIN_THRESHOLD)
    return torch.exp2(torch.ceil(torch.log2(t)))


def symmetric_params(threshold: Tensor, n_bits: int, signed: bool) -> tuple[Tensor, Tensor]:
    """``(scale, zero_point)`` of a grid symmetric around zero with the given threshold.

    Power-of-two is this with a power-of-two threshold (see :func:`pot_threshold`).
    """
    t = torch.clamp(threshold.float(), min=MIN_THRESHOLD)
    levels = 2 ** (n_bits - 1) if signed else 2**n_bits
    scale = t / levels
    return scale, torch.zeros_like(scale)


def uniform_params(lo: Tensor, hi: Tensor, n_bits: int) -> tuple[Tensor, Tensor]:
    """``(scale, zero_point)`` of an asymmetric grid over ``[lo, hi]`` widened to contain 0."""
    lo = torch.clamp(lo.float(), max=0.0)
    hi = torch.clamp(hi.float(), min=0.0)
    span = torch.clamp(hi - lo, min=MIN_THRESHOLD)
    qmax = 2**n_bits - 1
    scale = span / qmax
    zero_point = torch.clamp(torch.round(-lo / scale), 0, qmax)
    return scale, zero_point


def shift_negative_params(threshold: Tensor, minimum: Tensor, n_bits: int) -> tuple[Tensor, Tensor]:
    """Unsigned grid ``[0, threshold)`` shifted down by the smallest grid point >= ``-minimum``.

    Shift-negative correction: values in ``[minimum, threshold - shift)`` keep a
    zero-based unsigned grid (twice the resolution of a signed one) and the
    shift, an integer number of steps, becomes the zero point.  On hardware without
    zero points the shift is an add before the quantizer and a bias correction
    (and shift-valued padding) in the next linear layer.
    """
    scale = torch.clamp(threshold.float(), min=MIN_THRESHOLD) / 2**n_bits
    zero_point = torch.clamp(torch.ceil(-minimum.float() / scale), 0, 2**n_bits - 1)
    return scale, zero_point

