"""Quantize-dequantize ops: the pure-torch reference (the ground truth).

Every uniform scheme mct_fx knows (power-of-two, symmetric, uniform/asymmetric,
signed or unsigned, 2..16 bits, per-tensor or per-channel) reduces to one affine
fake-quantize with a scale, an integer zero point and an integer range; the
schemes differ only in how those parameters are chosen (see
``mct_fx.quantizers.params``).

Rounding rule (the same as ONNX ``QuantizeLinear``)::

    q = clamp(round_half_to_even(x / scale) + zero_point, qmin, qmax)
    y = (q - zero_point) * scale

computed in float32 whatever the input dtype, and cast back to the input dtype.
Fused kernels that land later must match this bit for bit, behind the same
functions.

Gradient: straight-through estimator masked to the clipping range
(``qmin <= round(x / scale) + zero_point <= qmax``); no gradient flows to
``scale`` / ``zero_point`` here (trainable-scale quantizers build their own).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["backend", "fake_quant", "quantize", "dequantize"]


def backend() -> str:
    """Which implementation runs the fake-quantize op ("reference": pure torch)."""
    return "reference"


def _broadcast(p: Tensor, x: Tensor, axis: int | None) -> Tensor:
    """Shape a per-channel parameter so it broadcasts along ``axis`` of ``x``."""
    if axis is None or p.dim() == 0:
        return p
    shape = [1] * x.dim()
    shape[axis] = -1
    return p.reshape(shape)


def quantize(x: Tensor, scale: Tensor, zero_point: Tensor, qmin: int, qmax: int,
             axis: int | None = None) -> Tensor:
    """Integer codes (as float32) of ``x``; see the module docstring for the rule."""
    s = _broadcast(scale.float(), x, axis)
    z = _broadcast(zero_point.float(), x, axis)
    return torch.clamp(torch.round(x.float() / s) + z, qmin, qmax)


def dequantize(q: Tensor, scale: Tensor, zero_point: Tensor, axis: int | None = None) -> Tensor:
    """Real values of integer codes ``q`` (float32)."""
    s = _broadcast(scale.float(), q, axis)
    z = _broadcast(zero_point.float(), q, axis)
    return (q - z) * s


class _FakeQuantSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scale, zero_point, qmin, qmax, axis):
        ctx.save_for_backward(x, scale, zero_point)
        ctx.qrange = (qmin, qmax, axis)
        return _fake_quant_exact(x, scale, zero_point, qmin, qmax, axis)

    @staticmethod
    def backward(ctx, grad):
        x, scale, zero_point = ctx.saved_tensors
        qmin, qmax, axis = ctx.qrange
        s = _broadcast(scale.float(), x, axis)
        z = _broadcast(zero_point.float(), x, axis)
        r = torch.round(x.float() / s) + z
        mask = (r >= qmin) & (r <= qmax)
        return grad * mask, None, None, None, None, None


def _fake_quant_exact(x: Tensor, scale: Tensor, zero_point: Tensor, qmin: int, qmax: int,
                      axis: int | None) -> Tensor:
    q = quantize(x, scale, zero_point, qmin, qmax, axis)
    return dequantize(q, scale, zero_point, axis).to(x.dtype)


def fake_quant(x: Tensor, scale: Tensor, zero_point: Tensor, qmin: int, qmax: int,
               axis: int | None = None) -> Tensor:
    """Quantize-dequantize ``x`` (per-tensor when ``axis`` is None, else per-channel along ``axis``).

    ``scale`` (float, > 0) and ``zero_point`` (integer-valued) are tensors, scalar or of
    length ``x.shape[axis]``, so no host synchronisation is needed.
    """
    if x.requires_grad and torch.is_grad_enabled():
        return _FakeQuantSTE.apply(x, scale, zero_point, qmin, qmax, axis)
    return _fake_quant_exact(x, scale, zero_point, qmin, qmax, axis)
