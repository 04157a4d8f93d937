"""Quantizer modules that live inside the graph.

Each holds its grid in buffers (``scale``, ``zero_point``) and its discrete
settings (mode, bits, signedness, integer range) in ``extra_state``, so
``state_dict()`` saved from a calibrated model and loaded into a freshly
prepared one reproduces it bit for bit.

Modes: ``observe`` (pass through, collect statistics), ``frozen`` (fake
quantize with the stored grid), ``off`` (pass through).  Frozen quantizers pass
straight-through gradients to their input (QAT's STE); :meth:`FakeQuantizer.learn_grid`
makes the grid itself trainable (LSQ), same ``state_dict`` keys.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from mct_fx.kernels import fake_quant
from mct_fx.quantizers.histogram import StreamingHistogram
from mct_fx.quantizers.params import QuantMethod, int_range
from mct_fx.quantizers.search import ErrorMethod, activation_grid, search_params
from mct_fx.quantizers.trainable import scale_grad, ste_round

__all__ = ["FakeQuantizer", "ActivationQuantizer", "WeightQuantizer", "MODES", "quantizers_off"]

MODES = ("observe", "frozen", "off")


class FakeQuantizer(nn.Module):
    """Common state of activation and weight quantizers."""

    affine = True  # the grid is scale + zero point (ONNX QDQ expresses it); a look-up-table quantizer is not

    def __init__(self, method: QuantMethod | str, n_bits: int, signed: bool | None, channels: int | None):
        super().__init__()
        self.method = QuantMethod(method)
        self.n_bits = int(n_bits)
        self.signed = signed  # None: decided from the data when frozen
        int_range(self.n_bits, True)  # validates n_bits
        shape = () if channels is None else (channels,)
        self.register_buffer("scale", torch.ones(shape))
        self.register_buffer("zero_point", torch.zeros(shape))
        self.mode = "observe"
        self.calibrated = False  # a grid has been chosen (by freeze or a loaded state_dict)
        self.qmin, self.qmax = self._range()

    def _range(self) -> tuple[int, int]:
        signed = False if self.method is QuantMethod.UNIFORM else bool(self.signed) if self.signed is not None else True
        return int_range(self.n_bits, signed)

    def set_mode(self, mode: str) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if mode == "frozen" and not self.calibrated:
            raise RuntimeError("this quantizer has no grid yet: call freeze(...) or load a calibrated state_dict")
        self.mode = mode

    @property
    def learning(self) -> bool:
        """The grid is being trained (LSQ), see :meth:`learn_grid`."""
        return isinstance(self.scale, nn.Parameter)

    def learn_grid(self, enable: bool = True) -> None:
        """LSQ: make the scale (and an asymmetric grid's zero point) trainable parameters; ``False`` fixes them.

        While learned, the forward scales their gradients by ``1/sqrt(elements per
        channel * qmax)`` (LSQ), keeps a power-of-two scale a power of two
        (rounded in log2, straight-through) and the zero point an integer; fixing
        stores exactly those effective values, so the fixed grid gives the same output.
        """
        if not self.affine:
            raise TypeError(f"{type(self).__name__}: a look-up-table grid has no scale to learn")
        if enable == self.learning:
            return
        if enable:
            if not self.calibrated:
                raise RuntimeError("this quantizer has no grid yet: freeze it before learning it")
            scale, zero_point = self.scale, self.zero_point
            del self.scale, self.zero_point
            self.scale = nn.Parameter(scale.clone())
            if self.method is QuantMethod.UNIFORM:
                self.zero_point = nn.Parameter(zero_point.clone())
            else:
                self.register_buffer("zero_point", zero_point)
            return
        with torch.no_grad():
            scale, zero_point = self._effective_grid(None)
        del self.scale, self.zero_point
        self.register_buffer("scale", scale.detach().clone())
        self.register_buffer("zero_point", zero_point.detach().clone())

    def _effective_grid(self, x: Tensor | None) -> tuple[Tensor, Tensor]:
        """Scale and zero point as the forward uses them (LSQ transforms while learning)."""
        if not self.learning:
            return self.scale, self.zero_point
        per_channel = 1 if x is None else max(1, x.numel() // self.scale.numel())
        g = 1.0 / math.sqrt(per_channel * max(self.qmax, 1))
        scale = scale_grad(self.scale, g).clamp_min(torch.finfo(torch.float32).tiny)
        if self.method is QuantMethod.POWER_OF_TWO:
            scale = torch.exp2(ste_round(torch.log2(scale)))
        zero_point = self.zero_point
        if isinstance(zero_point, nn.Parameter):
            zero_point = ste_round(scale_grad(zero_point, g)).clamp(self.qmin, self.qmax)
        return scale, zero_point

    def set_grid(self, scale: Tensor, zero_point: Tensor) -> None:
        """Store this grid (fixed, not learned) and switch to ``frozen``."""
        if self.learning:
            self.learn_grid(False)
        self.scale = scale.detach().to(self.scale.device, torch.float32).reshape(self.scale.shape).clone()
        self.zero_point = zero_point.detach().to(self.zero_point.device, torch.float32).reshape(
            self.zero_point.shape).clone()
        self.qmin, self.qmax = self._range()
        self.calibrated = True
        self.mode = "frozen"

    def copy_grid(self, other: FakeQuantizer) -> None:
        """Take ``other``'s grid (method, bits, signedness, scale, zero point) and freeze on it."""
        if self.scale.shape != other.scale.shape:
            raise ValueError(f"grid shapes differ: {tuple(self.scale.shape)} vs {tuple(other.scale.shape)}")
        self.method, self.n_bits, self.signed = other.method, other.n_bits, other.signed
        self.set_grid(other.scale, other.zero_point)

    def grid_range(self) -> tuple[Tensor, Tensor]:
        """Smallest and largest representable value (per channel for per-channel grids)."""
        return (self.qmin - self.zero_point) * self.scale, (self.qmax - self.zero_point) * self.scale

    def get_extra_state(self) -> dict[str, Any]:
        return {"mode": self.mode, "calibrated": self.calibrated, "method": self.method.value,
                "n_bits": self.n_bits, "signed": self.signed}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self.method = QuantMethod(state["method"])
        self.n_bits = int(state["n_bits"])
        self.signed = state["signed"]
        self.mode = state["mode"]
        self.calibrated = bool(state["calibrated"])
        self.qmin, self.qmax = self._range()

    def extra_repr(self) -> str:
        sign = {None: "auto-signed", True: "signed", False: "unsigned"}[self.signed]
        if self.method is QuantMethod.UNIFORM:
            sign = "asymmetric"
        return f"{self.method.value}, {self.n_bits} bits, {sign}, {self.mode}"


class ActivationQuantizer(FakeQuantizer):
    """Per-tensor activation quantizer: histogram in ``observe``, fake-quant once frozen."""

    def __init__(self, method: QuantMethod | str, n_bits: int, signed: bool | None = None):
        super().__init__(method, n_bits, signed, channels=None)
        self.observer = StreamingHistogram()

    def forward(self, x: Tensor) -> Tensor:
        if self.mode == "frozen":
            return fake_quant(x, *self._effective_grid(x), self.qmin, self.qmax)
        if self.mode == "observe":
            self.observer.update(x)
        return x

    def freeze(self, error: ErrorMethod | str = ErrorMethod.MSE, p: float = 2.0,
               shift_negative_ratio: float | None = None, z_threshold: float = math.inf,
               shift_negative_search: bool = False) -> None:
        """Choose the grid from the observed histogram and switch to ``frozen``.

        ``z_threshold``: ignore values more than this many standard deviations
        from the mean (see :func:`z_score_filter`).  ``shift_negative_ratio``:
        when the signedness is automatic, the grid is symmetric and the negative
        tail is at most this fraction of the threshold, use a shifted unsigned
        grid instead (see :func:`shift_negative_params`); ``shift_negative_search``:
        search that grid's threshold and shift together (:func:`search_shifted`).
        """
        if self.observer.empty:
            raise RuntimeError("activation quantizer saw no data during calibration")
        centres, counts = self.observer.centres_and_counts()
        scale, zp, self.signed = activation_grid(
            centres, counts, self.observer.min, self.observer.max, self.method, self.n_bits, self.signed, error, p,
            z_threshold=z_threshold, shift_negative_ratio=shift_negative_ratio,
            shift_negative_search=shift_negative_search)
        self.set_grid(scale, zp)
        self.observer = StreamingHistogram()


class WeightQuantizer(FakeQuantizer):
    """Weight quantizer, per-tensor or per-channel along ``axis``; weights use signed grids."""

    def __init__(self, method: QuantMethod | str, n_bits: int, channels: int | None = None, axis: int = 0):
        super().__init__(method, n_bits, signed=True, channels=channels)
        self.axis = axis if channels is not None else None

    def forward(self, w: Tensor) -> Tensor:
        if self.mode == "frozen":
            return fake_quant(w, *self._effective_grid(w), self.qmin, self.qmax, self.axis)
        return w

    def freeze(self, weight: Tensor, error: ErrorMethod | str = ErrorMethod.MSE, p: float = 2.0,
               importance: Tensor | None = None) -> None:
        """Choose the grid for ``weight`` and switch to ``frozen``.

        ``importance`` (the weight's shape, >= 0) weighs each element's error,
        e.g. by the second moment of the input it multiplies.
        """
        w = weight.detach()
        rows = self._rows(w)
        counts = None if importance is None else self._rows(importance.detach().to(w.device))
        scale, zp = search_params(rows, counts, rows.amin(1), rows.amax(1), self.method, self.n_bits, True, error, p)
        self.set_grid(scale, zp)

    def _rows(self, t: Tensor) -> Tensor:
        return t.movedim(self.axis, 0).reshape(t.shape[self.axis], -1) if self.axis is not None else t.reshape(1, -1)

    def extra_repr(self) -> str:
        where = "per-tensor" if self.axis is None else f"per-channel(axis={self.axis})"
        return f"{super().extra_repr()}, {where}"


@contextmanager
def quantizers_off(module: nn.Module) -> Iterator[None]:
    """Run ``module`` as its float self: every quantizer in it passes values through; modes come back after."""
    quantizers = [m for m in module.modules() if isinstance(m, FakeQuantizer)]
    modes = [q.mode for q in quantizers]
    for q in quantizers:
        q.mode = "off"
    try:
        yield
    finally:
        for q, mode in zip(quantizers, modes, strict=True):
            q.mode = mode
