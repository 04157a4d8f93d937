"""Threshold / range search: pick the quantization grid that minimises an error.

One entry point, :func:`search_params`, serves weights (raw values, one row per
output channel) and activations (a histogram: bin centres and counts).  It is
vectorised across channels and candidates: the candidate grids of every row are
evaluated together, in chunks bounded by memory, never in a Python loop per
channel.

Error methods:

* ``NOCLIPPING``: no search; the grid just covers the observed range.
* ``MSE`` / ``MAE`` / ``LP``: ``sum(count * |x - Q(x)|**p)`` with p = 2 / 1 / ``p``.
* ``KL``: KL divergence between the value distribution and its quantized
  version (mass of each quantization bucket spread over the bucket's
  non-empty bins), computed on a histogram.

Candidate sets always contain the no-clipping grid, so no method is worse
than ``NOCLIPPING`` by its own error measure.
"""

from __future__ import annotations

import enum
import math

import torch
from torch import Tensor

from mct_fx.kernels import candidate_blocks
from mct_fx.kernels import fit_scale as kernel_fit_scale
from mct_fx.kernels import quant_error as kernel_quant_error
from mct_fx.quantizers.histogram import z_score_filter
from mct_fx.quantizers.params import (
    MIN_THRESHOLD,
    QuantMethod,
    int_range,
    pot_threshold,
    shift_negative_params,
    symmetric_params,
    uniform_params,
)

__all__ = ["ErrorMethod", "search_params", "search_shifted", "activation_grid", "quant_error", "row_histograms"]

# Power-of-two candidates: t0 = 2**ceil(log2(max)), then 2*t0, t0/2, ..., t0/2**6.
_POT_EXPONENTS = (0, 1, -1, -2, -3, -4, -5, -6)
# Grids are ordered so that index 0 is the no-clipping grid: argmin returns the
# first of equal errors, so ties (and rows where every clipped grid is invalid)
# fall back to no clipping.  Thresholds go above the maximum too: with few values
# per channel, aligning the grid to them beats covering the maximum exactly.
_SYM_RANGE = (0.1, 1.25)  # coarse symmetric grid: these fractions of max|x| (linear) ...
_SYM_TAIL = torch.logspace(-1.1, -2, 10)  # ... and down to 1% (log-spaced) for extreme outliers
_SYM_REFINE = (torch.linspace(-0.025, 0.025, 11), torch.linspace(-0.005, 0.005, 21))
_SYM_BUDGET = 2**15  # coarse candidates x values per row: few values (depthwise kernels) get a dense grid
_LLOYD_STEPS = 4
_SYM_MAX_ALPHA = 1.25
_UNI_COARSE = torch.linspace(1.0, 1 / 16, 16)
_UNI_FINE = torch.linspace(-1 / 16, 1 / 16, 9)
_UNI_MAX_ALPHA = 1.1
_KL_BINS = 2048
_SHIFT_POT_EXPONENTS = (1, 0, -1, -2, -3, -4)
_SHIFT_TAIL = (1.0, 0.75, 0.5, 0.25, 0.0)  # fraction of the negative tail the shift covers


class ErrorMethod(str, enum.Enum):
    """What the threshold search minimises."""

    NOCLIPPING = "noclipping"
    MSE = "mse"
    MAE = "mae"
    LP = "lp"
    KL = "kl"
    HMSE = "hmse"  # weights only: MSE weighted per element by the label-free Hessian (the caller's ``counts``)


def _p_of(error: ErrorMethod, p: float) -> float:
    return {ErrorMethod.MSE: 2.0, ErrorMethod.MAE: 1.0}.get(error, p)


def quant_error(values: Tensor, counts: Tensor | None, scale: Tensor, zero_point: Tensor | None,
                qmin: int, qmax: int, error: ErrorMethod = ErrorMethod.MSE, p: float = 2.0) -> Tensor:
    """Error of every candidate grid on every row.

    ``values``: ``[R, N]`` (rows: channels, or one histogram); ``counts``: ``[R or 1, N]``
    weights of the values (None: all ones); ``scale``/``zero_point``: ``[R, K]``
    (``zero_point`` None: all zero).  Returns ``[R, K]``.  KL needs ``values`` to be
    evenly spaced sorted bin centres and gives ``inf`` to grids whose step is
    finer than a bin.  The Lp errors come from the fused ``mct_fx::quant_error`` op.
    """
    if error is not ErrorMethod.KL:
        return kernel_quant_error(values, counts, scale, zero_point, qmin, qmax, _p_of(error, p))
    n = values.shape[1]
    values = values.float()
    counts = torch.ones_like(values[:1]) if counts is None else counts.float()
    out = torch.empty(scale.shape, device=values.device, dtype=torch.float32)
    for (r0, r1), (k0, k1) in candidate_blocks(values.shape[0], scale.shape[1], n):
        v = values[r0:r1, None, :]
        c = counts if counts.shape[0] == 1 else counts[r0:r1]
        s = scale[r0:r1, k0:k1, None]
        t = torch.round(v / s)
        if zero_point is not None:
            t.add_(zero_point[r0:r1, k0:k1, None])
        kl = _kl(t, c.expand(t.shape[0], -1), qmin, qmax)
        # a quantization step finer than a histogram bin makes KL meaningless (0)
        width = (v[:, :, 1:2] - v[:, :, 0:1]) if n > 1 else torch.zeros_like(v[:, :, :1])
        out[r0:r1, k0:k1] = torch.where(s[..., 0] < width[..., 0] * 0.999, torch.inf, kl)
    return out


def _kl(codes: Tensor, counts: Tensor, qmin: int, qmax: int) -> Tensor:
    """KL(P || Q) per candidate, the TensorRT way.

    ``codes``: unclamped integer codes ``[R, K, N]`` of sorted values.  P is the
    histogram with the clipped mass moved onto the first/last in-range bin; Q
    spreads each bucket's in-range mass (clipped mass excluded) evenly over the
    bucket's non-empty bins, so clipping shows up as a mismatch at the edges.
    """
    r, k, n = codes.shape
    h = counts[:, None, :].expand(r, k, n)
    below, above = codes < qmin, codes > qmax
    inside = ~(below | above)
    first = inside.float().argmax(-1, keepdim=True)
    last = n - 1 - inside.flip(-1).float().argmax(-1, keepdim=True)
    h_in = torch.where(inside, h, 0.0)
    p = h_in.scatter_add(-1, first, (h * below).sum(-1, keepdim=True))
    p = p.scatter_add(-1, last, (h * above).sum(-1, keepdim=True))
    codes = torch.clamp(codes, qmin, qmax).contiguous()
    zero = torch.zeros(r, k, 1, device=codes.device)
    cum_mass = torch.cat([zero, torch.cumsum(h_in, -1)], -1)
    cum_nz = torch.cat([zero, torch.cumsum((h_in > 0).float(), -1)], -1)
    lo = torch.searchsorted(codes, codes, right=False)
    hi = torch.searchsorted(codes, codes, right=True)
    seg_mass = cum_mass.gather(-1, hi) - cum_mass.gather(-1, lo)
    seg_nz = (cum_nz.gather(-1, hi) - cum_nz.gather(-1, lo)).clamp(min=1)
    q = torch.where(h_in > 0, seg_mass / seg_nz, 0.0)
    p = p / p.sum(-1, keepdim=True).clamp(min=1e-30)
    q = q / q.sum(-1, keepdim=True).clamp(min=1e-30)
    terms = torch.where(p > 0, p * torch.log(p / q.clamp(min=1e-12)), 0.0)
    return torch.where(inside.any(-1), terms.sum(-1), torch.inf)


def row_histograms(values: Tensor, lo: Tensor, hi: Tensor, bins: int | None = None) -> tuple[Tensor, Tensor]:
    """Per-row histograms of ``values`` ``[R, N]`` over ``[lo, hi]``: (sorted, evenly spaced centres, counts)."""
    bins = bins or min(_KL_BINS, max(64, values.shape[1] // 4))
    lo, hi = lo.float()[:, None], hi.float()[:, None]
    width = torch.clamp((hi - lo) / bins, min=1e-12)
    idx = torch.clamp(torch.floor((values.float() - lo) / width), 0, bins - 1).long()
    counts = torch.zeros(values.shape[0], bins, device=values.device).scatter_add_(
        1, idx, torch.ones_like(values, dtype=torch.float32))
    centres = lo + (torch.arange(bins, device=values.device) + 0.5) * width
    return centres, counts


def _best(errors: Tensor, scale: Tensor, zero_point: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    idx = errors.argmin(1, keepdim=True)
    return scale.gather(1, idx)[:, 0], zero_point.gather(1, idx)[:, 0], idx[:, 0]


def search_params(values: Tensor, counts: Tensor | None, lo: Tensor, hi: Tensor, method: QuantMethod,
                  n_bits: int, signed: bool, error: ErrorMethod = ErrorMethod.MSE,
                  p: float = 2.0) -> tuple[Tensor, Tensor]:
    """Best ``(scale, zero_point)`` per row.

    ``values`` ``[R, N]`` with optional ``counts``; ``lo``/``hi`` ``[R]`` the exact
    observed minimum/maximum of each row.  ``signed`` is ignored for uniform grids.
    """
    method, error = QuantMethod(method), ErrorMethod(error)
    if error is ErrorMethod.HMSE:
        if counts is None:
            raise ValueError("the HMSE error method needs per-element Hessian weights (counts / importance)")
        error = ErrorMethod.MSE
    lo, hi = lo.float(), hi.float()
    if error is ErrorMethod.KL and counts is None:
        values, counts = row_histograms(values, lo, hi)
    if method is QuantMethod.UNIFORM:
        return _search_uniform(values, counts, lo, hi, n_bits, error, p)
    qmin, qmax = int_range(n_bits, signed)
    maxabs = torch.maximum(lo.abs(), hi.abs()) if signed else torch.clamp(hi, min=0.0)
    if method is QuantMethod.POWER_OF_TWO:
        t0 = pot_threshold(maxabs)
        exponents = (0,) if error is ErrorMethod.NOCLIPPING else _POT_EXPONENTS
        factors = torch.exp2(torch.tensor(exponents, dtype=torch.float32, device=lo.device))
        scale, zp = symmetric_params(t0[:, None] * factors[None, :], n_bits, signed)
        if len(exponents) == 1:
            return scale[:, 0], zp[:, 0]
        return _best(quant_error(values, counts, scale, None, qmin, qmax, error, p), scale, zp)[:2]
    if error is ErrorMethod.NOCLIPPING:
        return symmetric_params(maxabs, n_bits, signed)
    def evaluate(alphas: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        scale, zp = symmetric_params(maxabs[:, None] * alphas, n_bits, signed)
        s, z, idx = _best(quant_error(values, counts, scale, None, qmin, qmax, error, p), scale, zp)
        return s, z, alphas.gather(1, idx[:, None])[:, 0]

    n_coarse = int(min(400, max(46, _SYM_BUDGET // max(1, values.shape[1]))))
    coarse = torch.cat([torch.ones(1), torch.linspace(_SYM_RANGE[1], _SYM_RANGE[0], n_coarse - 1), _SYM_TAIL])
    s, z, best = evaluate(coarse.to(lo.device)[None, :].expand(lo.shape[0], -1))
    for step in _SYM_REFINE:  # refine around the best so far, keeping no clipping as candidate 0
        around = torch.clamp(best[:, None] + step.to(lo.device)[None, :], 1e-3, _SYM_MAX_ALPHA)
        s, z, best = evaluate(torch.cat([torch.ones_like(around[:, :1]), around], 1))
    if method is QuantMethod.SYMMETRIC and error is ErrorMethod.MSE:
        s = _lloyd(values, counts, s, qmin, qmax)
    return s, z


def _lloyd(values: Tensor, counts: Tensor | None, scale: Tensor, qmin: int, qmax: int) -> Tensor:
    """Alternate codes and least-squares scale (each step never raises the weighted MSE).

    For fixed codes ``k`` the best scale is ``sum(c w k) / sum(c k^2)``; for a fixed
    scale the best codes are the rounded, clamped ``w / s``.  On rows with few
    values, where the error is a jagged function of the scale, this reaches the
    bottom of the valley a grid search lands in.
    """
    best = scale.clone()
    best_err = quant_error(values, counts, best[:, None], None, qmin, qmax)[:, 0]
    s = scale
    for _ in range(_LLOYD_STEPS):
        s = kernel_fit_scale(values, counts, s, qmin, qmax).clamp(min=MIN_THRESHOLD)
        err = quant_error(values, counts, s[:, None], None, qmin, qmax)[:, 0]
        better = err < best_err
        best, best_err = torch.where(better, s, best), torch.where(better, err, best_err)
    return best


def _search_uniform(values: Tensor, counts: Tensor | None, lo: Tensor, hi: Tensor, n_bits: int,
                    error: ErrorMethod, p: float) -> tuple[Tensor, Tensor]:
    qmin, qmax = int_range(n_bits, signed=False)
    if error is ErrorMethod.NOCLIPPING:
        return uniform_params(lo, hi, n_bits)

    def evaluate(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        # a, b: [R, K] shrink factors for the low and high end
        scale, zp = uniform_params(lo[:, None] * a, hi[:, None] * b, n_bits)
        return _best(quant_error(values, counts, scale, zp, qmin, qmax, error, p), scale, zp)

    g = _UNI_COARSE.to(lo.device)
    rows = lo.shape[0]
    a, b = torch.meshgrid(g, g, indexing="ij")
    a, b = a.reshape(1, -1).expand(rows, -1), b.reshape(1, -1).expand(rows, -1)
    _, _, idx = evaluate(a, b)
    f = _UNI_FINE.to(lo.device)
    da, db = torch.meshgrid(f, f, indexing="ij")
    a = torch.clamp(a.gather(1, idx[:, None]) + da.reshape(1, -1), 1e-3, _UNI_MAX_ALPHA)
    b = torch.clamp(b.gather(1, idx[:, None]) + db.reshape(1, -1), 1e-3, _UNI_MAX_ALPHA)
    ones = torch.ones(rows, 1, device=lo.device)
    scale, zp, _ = evaluate(torch.cat([ones, a], 1), torch.cat([ones, b], 1))
    return scale, zp


def search_shifted(values: Tensor, counts: Tensor | None, lo: Tensor, hi: Tensor, method: QuantMethod,
                   n_bits: int, error: ErrorMethod = ErrorMethod.MSE, p: float = 2.0) -> tuple[Tensor, Tensor]:
    """Best shifted unsigned grid (scale, integer zero point) for one row with a negative minimum.

    Shift-negative correction with parameter search: the threshold (a power of two
    for ``POWER_OF_TWO``) and how much of the negative tail the shift covers are
    searched together, by the same error as :func:`search_params`.
    """
    method, error = QuantMethod(method), ErrorMethod(error)
    qmax = 2**n_bits - 1
    span = torch.clamp((hi - torch.clamp(lo, max=0.0)).float().reshape(1), min=MIN_THRESHOLD)
    if method is QuantMethod.POWER_OF_TWO:
        factors = torch.exp2(torch.tensor(_SHIFT_POT_EXPONENTS, dtype=torch.float32, device=lo.device))
        thresholds = pot_threshold(span) * factors
    else:
        thresholds = span * torch.linspace(_SYM_MAX_ALPHA, _SYM_RANGE[0], 48, device=lo.device)
    scale = (thresholds / 2**n_bits)[:, None].expand(-1, len(_SHIFT_TAIL))
    tail = torch.tensor(_SHIFT_TAIL, device=lo.device)[None, :]
    zero_point = torch.clamp(torch.ceil(-torch.clamp(lo.float(), max=0.0) * tail / scale), 0, qmax)
    scale, zero_point = scale.reshape(1, -1), zero_point.reshape(1, -1)
    errors = quant_error(values, counts, scale, zero_point, 0, qmax, error, p)
    s, z, _ = _best(errors, scale, zero_point)
    return s, z


def activation_grid(centres: Tensor, counts: Tensor, lo: Tensor, hi: Tensor, method: QuantMethod, n_bits: int,
                    signed: bool | None, error: ErrorMethod | str, p: float, *, z_threshold: float = math.inf,
                    shift_negative_ratio: float | None = None,
                    shift_negative_search: bool = False) -> tuple[Tensor, Tensor, bool]:
    """The grid policy for an activation, from its histogram: ``(scale, zero_point, signed)``.

    Values more than ``z_threshold`` standard deviations from the mean are left
    out (:func:`z_score_filter`); ``signed=None`` chooses the sign (signed when
    negatives remain); the threshold minimises ``error``.  With
    ``shift_negative_ratio``, an automatically signed symmetric-family grid whose
    negative tail is at most that fraction of the threshold becomes a shifted
    unsigned grid (:func:`shift_negative_params`, or searched with the shift
    when ``shift_negative_search``).
    """
    if math.isfinite(z_threshold):
        centres, counts, lo, hi = z_score_filter(centres, counts, lo, hi, z_threshold)
    auto_sign = signed is None
    signed = bool(lo < 0) if auto_sign else bool(signed)
    scale, zp = search_params(centres[None], counts[None], lo.reshape(1), hi.reshape(1), method, n_bits, signed,
                              error, p)
    if shift_negative_ratio is not None and auto_sign and signed and method.symmetric_grid:
        threshold = scale * 2 ** (n_bits - 1)
        if float(-lo) <= shift_negative_ratio * float(threshold):
            signed = False
            if shift_negative_search:
                scale, zp = search_shifted(centres[None], counts[None], lo, hi, method, n_bits, error, p)
            else:
                scale, zp = shift_negative_params(threshold, lo, n_bits)
    return scale, zp, signed
