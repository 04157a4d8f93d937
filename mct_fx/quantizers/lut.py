"""Look-up-table (non-uniform) quantization: k-means centres times a per-channel threshold.

A tensor is divided by its threshold (per channel for weights: the maximum
``|w|``, rounded up to a power of two for ``LUT_POT``), and ``2**n_bits`` centres
are fitted to the normalised values by weighted 1-D k-means (Lloyd): one table
per tensor, shared by its channels (what the IMX500 runs: a table per layer, a
threshold per channel), for activations on the calibration histogram.  Zero is always a
centre (zero-valued weights and ReLU zeros stay exact), and the centres are
rounded to an 8-bit grid in threshold units, so a table is 8-bit integers.
Pure torch; activations use the ``mct_fx::fake_quant_lut`` op.
"""

from __future__ import annotations

import torch
from torch import Tensor

from mct_fx.kernels import fake_quant_lut
from mct_fx.quantizers.histogram import StreamingHistogram, z_score_filter
from mct_fx.quantizers.modules import ActivationQuantizer, WeightQuantizer
from mct_fx.quantizers.params import LUT_VALUE_BITS, MAX_LUT_BITS, MIN_THRESHOLD, QuantMethod, pot_threshold
from mct_fx.quantizers.search import ErrorMethod

__all__ = ["kmeans_1d", "lut_centers", "lut_fake_quant_rows", "LutWeightQuantizer", "LutActivationQuantizer"]
_ITERATIONS = 40
_BINS = 4096


def kmeans_1d(values: Tensor, weights: Tensor | None, k: int, fixed: float | None = 0.0,
              iterations: int = _ITERATIONS) -> Tensor:
    """Per row, ``k`` sorted centres minimising the weighted squared distance of the values to their nearest.

    ``values`` ``[R, N]`` (or ``[N]``), ``weights`` the same shape (None: ones).  ``fixed``: a
    value that stays a centre (it replaces the initial centre nearest to it).  Initialised at
    weighted quantiles; an empty (or duplicate) centre moves to the worst-served value.
    Returns ``[R, k]`` (or ``[k]``).
    """
    flat = values.dim() == 1
    values = values.double().reshape(1, -1) if flat else values.double()
    weights = torch.ones_like(values) if weights is None else weights.double().reshape(values.shape)
    values, order = torch.sort(values, 1)
    weights = weights.gather(1, order)
    rows = values.shape[0]
    cdf = torch.cumsum(weights, 1)
    targets = (torch.arange(k, dtype=torch.float64, device=values.device) + 0.5) / k * cdf[:, -1:]
    idx = torch.clamp(torch.searchsorted(cdf.contiguous(), targets.contiguous()), max=values.shape[1] - 1)
    centres = values.gather(1, idx)
    pinned = None
    if fixed is not None:
        pinned = (centres - fixed).abs().argmin(1, keepdim=True)
        centres.scatter_(1, pinned, fixed)
    for _ in range(iterations):
        centres = torch.sort(centres, 1).values  # the pinned value stays a centre wherever it sorts to
        if fixed is not None:
            pinned = (centres - fixed).abs().argmin(1, keepdim=True)
        assign = torch.searchsorted(((centres[:, 1:] + centres[:, :-1]) / 2).contiguous(), values.contiguous())
        mass = torch.zeros(rows, k, dtype=torch.float64, device=values.device).scatter_add_(1, assign, weights)
        total = torch.zeros_like(mass).scatter_add_(1, assign, weights * values)
        new = torch.where(mass > 0, total / mass.clamp(min=1e-300), centres)
        _reseed_empty(new, mass, values, weights, assign, pinned)
        if pinned is not None:
            new.scatter_(1, pinned, fixed)
        done = torch.allclose(new, centres, rtol=0, atol=1e-9)
        centres = new
        if done:
            break
    centres = torch.sort(centres, 1).values
    return centres[0] if flat else centres


def _reseed_empty(centres: Tensor, mass: Tensor, values: Tensor, weights: Tensor, assign: Tensor,
                  pinned: Tensor | None) -> None:
    """Move one empty (or duplicate) centre per row onto the value with the largest weighted error."""
    empty = mass == 0
    if pinned is not None:
        empty.scatter_(1, pinned, False)
    has = empty.any(1, keepdim=True)
    if not bool(has.any()):
        return
    err = weights * (values - centres.gather(1, assign)) ** 2
    worst = values.gather(1, err.argmax(1, keepdim=True))
    slot = empty.float().argmax(1, keepdim=True)
    centres.scatter_(1, slot, torch.where(has, worst, centres.gather(1, slot)))


def lut_centers(values: Tensor, weights: Tensor | None, n_bits: int, signed: bool) -> Tensor:
    """Tables of ``2**n_bits`` centres for normalised values (in [-1, 1], or [0, 1] unsigned), per row,
    on the 8-bit grid (the table entries are integers times ``1/128``, or ``1/256`` unsigned)."""
    if not 2 <= n_bits <= MAX_LUT_BITS:
        raise ValueError(f"look-up-table quantizers take 2..{MAX_LUT_BITS} bits, got {n_bits}")
    fitted = kmeans_1d(values, weights, 2**n_bits)
    levels = 2 ** (LUT_VALUE_BITS - 1) if signed else 2**LUT_VALUE_BITS
    lo = -levels if signed else 0
    return (torch.clamp(torch.round(fitted * levels), lo, levels - 1) / levels).float()


def lut_fake_quant_rows(rows: Tensor, centers: Tensor, scale: Tensor) -> Tensor:
    """Each row of ``rows`` ``[R, N]`` onto the table ``centers`` ``[K]`` times its ``scale`` ``[R]``.

    The gradient is the straight-through estimator (identity), as for the uniform grids.
    """
    s = scale[:, None]
    u = rows.float() / s
    centers = centers.reshape(1, -1).expand(rows.shape[0], -1)
    mid = ((centers[:, 1:] + centers[:, :-1]) / 2).contiguous()
    idx = torch.searchsorted(mid, u.detach().contiguous())
    q = centers.gather(1, idx) * s
    return rows + (q.to(rows.dtype) - rows).detach()


def _threshold(maxabs: Tensor, method: QuantMethod) -> Tensor:
    t = torch.clamp(maxabs.float(), min=MIN_THRESHOLD)
    return pot_threshold(t) if method is QuantMethod.LUT_POT else t


class LutWeightQuantizer(WeightQuantizer):
    """Weights on one k-means table times a threshold (``scale``, per output channel for per-channel
    quantizers)."""

    affine = False

    def __init__(self, method: QuantMethod | str, n_bits: int, channels: int | None = None, axis: int = 0):
        super().__init__(method, n_bits, channels=channels, axis=axis)
        if not self.method.is_lut or not 2 <= self.n_bits <= MAX_LUT_BITS:
            raise ValueError(f"LutWeightQuantizer needs a LUT method and 2..{MAX_LUT_BITS} bits, "
                             f"got {self.method.value} / {self.n_bits}")
        self.register_buffer("centers", torch.zeros(2**self.n_bits))

    def forward(self, w: Tensor) -> Tensor:
        if self.mode != "frozen":
            return w
        rows = self._rows(w)
        q = lut_fake_quant_rows(rows, self.centers, self.scale.reshape(-1))
        if self.axis is None:
            return q.reshape(w.shape)
        moved = w.movedim(self.axis, 0).shape
        return q.reshape(moved).movedim(0, self.axis)

    def freeze(self, weight: Tensor, error: ErrorMethod | str = ErrorMethod.MSE, p: float = 2.0,
               importance: Tensor | None = None) -> None:
        """Fit threshold and centres to ``weight`` (k-means minimises the squared error; ``error`` is unused)."""
        w = weight.detach().float()
        rows = self._rows(w)
        threshold = _threshold(rows.abs().amax(1), self.method)
        mass = None if importance is None else self._rows(importance.detach().to(w.device)).reshape(-1)
        normalised = (rows / threshold[:, None]).reshape(-1)
        self.centers = lut_centers(normalised, mass, self.n_bits, signed=True).to(self.scale.device)
        self.set_grid(threshold, torch.zeros_like(threshold))

    def grid_range(self) -> tuple[Tensor, Tensor]:
        return self.centers.amin() * self.scale, self.centers.amax() * self.scale


class LutActivationQuantizer(ActivationQuantizer):
    """Per-tensor activation on a table of weighted k-means centres of its calibration histogram."""

    affine = False

    def __init__(self, method: QuantMethod | str, n_bits: int, signed: bool | None = None):
        super().__init__(method, n_bits, signed)
        if not self.method.is_lut or not 2 <= self.n_bits <= MAX_LUT_BITS:
            raise ValueError(f"LutActivationQuantizer needs a LUT method and 2..{MAX_LUT_BITS} bits, "
                             f"got {self.method.value} / {self.n_bits}")
        self.register_buffer("centers", torch.zeros(2**self.n_bits))

    def forward(self, x: Tensor) -> Tensor:
        if self.mode == "frozen":
            return fake_quant_lut(x, self.centers, self.scale, None)
        if self.mode == "observe":
            self.observer.update(x)
        return x

    def freeze(self, error: ErrorMethod | str = ErrorMethod.MSE, p: float = 2.0,
               shift_negative_ratio: float | None = None, z_threshold: float = float("inf"),
               shift_negative_search: bool = False) -> None:
        """Fit threshold and centres to the observed histogram (``error`` and shift-negative do not apply)."""
        if self.observer.empty:
            raise RuntimeError("activation quantizer saw no data during calibration")
        centres, counts = self.observer.centres_and_counts()
        lo, hi = self.observer.min, self.observer.max
        if z_threshold != float("inf"):
            centres, counts, lo, hi = z_score_filter(centres, counts, lo, hi, z_threshold)
        if self.signed is None:
            self.signed = bool(lo < 0)
        threshold = _threshold(torch.maximum(lo.abs(), hi.abs()) if self.signed else hi.clamp(min=0), self.method)
        normalised = torch.clamp(centres / threshold, -1.0 if self.signed else 0.0, 1.0)
        self.centers = lut_centers(normalised, counts, self.n_bits, bool(self.signed)).to(self.scale.device)
        self.set_grid(threshold.reshape(()), torch.zeros(()))
        self.observer = StreamingHistogram()

    grid_range = LutWeightQuantizer.grid_range

