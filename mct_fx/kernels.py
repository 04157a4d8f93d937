"""Quantize-dequantize ops: one real PyTorch op per operation, fused kernels behind it.

Every uniform scheme mct_fx knows (power-of-two, symmetric, uniform/asymmetric,
signed or unsigned, 2..16 bits, per-tensor or per-channel) reduces to one affine
fake-quantize with a scale, an integer-valued zero point and an integer range;
the schemes differ only in how those parameters are chosen (see
``mct_fx.quantizers.params``).

Rounding rule (the same as ONNX ``QuantizeLinear``)::

    q = clamp(round_half_to_even(x / scale) + zero_point, qmin, qmax)
    y = (q - zero_point) * scale

computed in float32 (float64 for float64 inputs) and cast back to the input
dtype.  NaN in gives NaN out; +-inf clamp to the grid ends.

The ops live in the ``torch.ops.mct_fx`` namespace, so autograd,
``torch.compile(fullgraph=True)`` and ``torch.export`` see one op each:

* ``fake_quant(x, scale, zero_point, qmin, qmax, axis)``; its gradient is the
  straight-through estimator masked to the clipping range, computed from the
  saved input (``fake_quant_backward``), plus the LSQ gradients of ``scale`` and
  ``zero_point`` when those require grad (``fake_quant_lsq_backward``, reduced
  inside the kernel).  The compiled library registers this autograd in C++
  (``csrc/autograd.cpp``); the Python functions below serve the reference backend;
* ``fake_quant_lut(x, centers, scale, axis)``: nearest of the sorted ``centers``
  (ties to the lower one) times ``scale``; STE gradient inside
  ``[min(centers), max(centers)] * scale``;
* ``quant_error(values, counts, scale, zero_point, qmin, qmax, p)``: the Lp
  error of many candidate grids on many rows at once, and ``fit_scale``, the
  least-squares scale of a grid's codes, for the parameter search; ``histogram``
  for the calibration statistics.

The pure-torch functions ``reference_*`` below are the ground truth: they are
registered for every device as the fallback, and the fused C++ (CPU) kernels
that override them must match them bit for bit (LSQ scale/zero-point sums up to
summation order).  ``MCT_FX_KERNELS=reference`` forces the reference.
"""

from __future__ import annotations

import torch
from torch import Tensor

from mct_fx import _extension

__all__ = [
    "backend", "fake_quant", "fake_quant_lut", "quantize", "dequantize", "decompositions", "quant_error",
    "reference_quant_error", "fit_scale", "reference_fit_scale",
    "histogram", "reference_histogram",
    "reference_fake_quant", "reference_fake_quant_backward", "reference_fake_quant_lsq_backward",
    "reference_fake_quant_lut", "reference_fake_quant_lut_backward",
]

_LIB = torch.library.Library("mct_fx", "DEF")
_LIB.define("fake_quant(Tensor x, Tensor scale, Tensor zero_point, int qmin, int qmax, int? axis) -> Tensor")
_LIB.define("fake_quant_backward(Tensor grad, Tensor x, Tensor scale, Tensor zero_point, int qmin, int qmax, "
            "int? axis) -> Tensor")
_LIB.define("fake_quant_lsq_backward(Tensor grad, Tensor x, Tensor scale, Tensor zero_point, int qmin, int qmax, "
            "int? axis) -> (Tensor, Tensor, Tensor)")
_LIB.define("fake_quant_lut(Tensor x, Tensor centers, Tensor scale, int? axis) -> Tensor")
_LIB.define("fake_quant_lut_backward(Tensor grad, Tensor x, Tensor centers, Tensor scale, int? axis) -> Tensor")
_LIB.define("quant_error(Tensor values, Tensor? counts, Tensor scale, Tensor? zero_point, int qmin, int qmax, "
            "float p) -> Tensor")
_LIB.define("fit_scale(Tensor values, Tensor? counts, Tensor scale, int qmin, int qmax) -> Tensor")
_LIB.define("histogram(Tensor x, Tensor range, int bins) -> Tensor")


# ----------------------------------------------------------------- reference


def _compute(x: Tensor) -> Tensor:
    """``x`` in the compute dtype: float64 stays float64, everything else becomes float32."""
    return x if x.dtype == torch.float64 else x.float()


def _broadcast(p: Tensor, x: Tensor, axis: int | None) -> Tensor:
    """Shape a per-channel parameter so it broadcasts along ``axis`` of ``x`` (in ``x``'s compute dtype)."""
    p = p.to(torch.float64 if x.dtype == torch.float64 else torch.float32)
    if axis is None or p.numel() == 1:
        return p.reshape(())
    shape = [1] * x.dim()
    shape[axis] = -1
    return p.reshape(shape)


def _reduce_to(t: Tensor, like: Tensor, x: Tensor, axis: int | None) -> Tensor:
    """Sum ``t`` (shaped like ``x``) to the shape of the parameter ``like``."""
    if axis is None or like.numel() == 1:
        return t.sum().reshape(like.shape).to(like.dtype)
    dims = [d for d in range(x.dim()) if d != axis % x.dim()]
    return (t.sum(dims) if dims else t).reshape(like.shape).to(like.dtype)  # sum([]) would reduce everything


def quantize(x: Tensor, scale: Tensor, zero_point: Tensor, qmin: int, qmax: int,
             axis: int | None = None) -> Tensor:
    """Integer codes of ``x`` (in the compute dtype); see the module docstring for the rule."""
    s, z = _broadcast(scale, x, axis), _broadcast(zero_point, x, axis)
    return torch.clamp(torch.round(_compute(x) / s) + z, qmin, qmax)


def dequantize(q: Tensor, scale: Tensor, zero_point: Tensor, axis: int | None = None) -> Tensor:
    """Real values of integer codes ``q``."""
    return (q - _broadcast(zero_point, q, axis)) * _broadcast(scale, q, axis)


def reference_fake_quant(x: Tensor, scale: Tensor, zero_point: Tensor, qmin: int, qmax: int,
                         axis: int | None) -> Tensor:
    return dequantize(quantize(x, scale, zero_point, qmin, qmax, axis), scale, zero_point, axis).to(x.dtype)


def _inside(x: Tensor, scale: Tensor, zero_point: Tensor, qmin: int, qmax: int, axis: int | None) -> Tensor:
    r = torch.round(_compute(x) / _broadcast(scale, x, axis)) + _broadcast(zero_point, x, axis)
    return (r >= qmin) & (r <= qmax)


def reference_fake_quant_backward(grad: Tensor, x: Tensor, scale: Tensor, zero_point: Tensor, qmin: int, qmax: int,
                                  axis: int | None) -> Tensor:
    inside = _inside(x, scale, zero_point, qmin, qmax, axis)
    return torch.where(inside, grad, torch.zeros((), dtype=grad.dtype, device=grad.device)).to(x.dtype)


def reference_fake_quant_lsq_backward(grad: Tensor, x: Tensor, scale: Tensor, zero_point: Tensor, qmin: int,
                                      qmax: int, axis: int | None) -> tuple[Tensor, Tensor, Tensor]:
    """LSQ gradients: STE for ``x``; for the grid, the derivative of ``(clamp(q) - z) * s`` with
    ``round`` passed straight through (``round(v) - v`` inside the range, ``q_clamped - z``
    outside; ``0`` / ``-s`` for the zero point), times ``grad`` in the compute dtype, summed
    in float64."""
    s, z = _broadcast(scale, x, axis), _broadcast(zero_point, x, axis)
    v = _compute(x) / s
    r = torch.round(v)
    q = r + z
    inside = (q >= qmin) & (q <= qmax)
    clamped = torch.where(q < qmin, float(qmin), float(qmax))
    g = _compute(grad)
    grad_x = torch.where(inside, grad, torch.zeros((), dtype=grad.dtype, device=grad.device)).to(x.dtype)
    grad_s = (g * torch.where(inside, r - v, clamped - z)).double()
    grad_z = torch.where(inside, torch.zeros((), dtype=g.dtype, device=x.device), -(g * s)).double()
    return grad_x, _reduce_to(grad_s, scale, x, axis), _reduce_to(grad_z, zero_point, x, axis)


def reference_fake_quant_lut(x: Tensor, centers: Tensor, scale: Tensor, axis: int | None) -> Tensor:
    s = _broadcast(scale, x, axis)
    c = torch.sort(centers.to(s.dtype).reshape(-1)).values
    v = _compute(x) / s
    vc = torch.clamp(v, c.min(), c.max())  # outside the centers the nearest is an end one (also for +-inf)
    idx = (vc.unsqueeze(-1) - c).abs().argmin(-1)  # first minimum: ties go to the lower center
    return torch.where(torch.isnan(v), v, c[idx] * s).to(x.dtype)


def reference_fake_quant_lut_backward(grad: Tensor, x: Tensor, centers: Tensor, scale: Tensor,
                                      axis: int | None) -> Tensor:
    s = _broadcast(scale, x, axis)
    c = centers.to(s.dtype).reshape(-1)
    v = _compute(x) / s
    inside = (v >= c.min()) & (v <= c.max())
    return torch.where(inside, grad, torch.zeros((), dtype=grad.dtype, device=grad.device)).to(x.dtype)


_CHUNK_ELEMENTS = 1 << 20  # values per block of the reference quant_error (cache-sized)


def candidate_blocks(rows: int, k_total: int, n: int):
    """``((r0, r1), (k0, k1))`` blocks of rows and candidates whose ``[rows, candidates, n]``
    intermediate stays cache-sized (about ``2**20`` values)."""
    chunk_k = min(k_total, max(1, _CHUNK_ELEMENTS // n))
    chunk_r = max(1, _CHUNK_ELEMENTS // (chunk_k * n))
    for r0 in range(0, rows, chunk_r):
        for k0 in range(0, k_total, chunk_k):
            yield (r0, min(rows, r0 + chunk_r)), (k0, min(k_total, k0 + chunk_k))


def reference_quant_error(values: Tensor, counts: Tensor | None, scale: Tensor, zero_point: Tensor | None,
                          qmin: int, qmax: int, p: float) -> Tensor:
    """``[R, K]``: for row ``r`` and candidate grid ``k``, the sum over the row's values ``v``
    (weighted by ``counts``, ``[1 or R, N]``) of ``|fake_quant(v) - v|^p`` on the grid
    ``scale[r, k]``, ``zero_point[r, k]`` (None: 0), ``qmin..qmax``.  Blocks of rows and
    candidates with in-place ops keep the ``[R, K, N]`` intermediate cache-sized."""
    values = values.float()
    counts = None if counts is None else counts.float()
    out = torch.empty(scale.shape, device=values.device, dtype=torch.float32)
    for (r0, r1), (k0, k1) in candidate_blocks(values.shape[0], scale.shape[1], values.shape[1]):
        v = values[r0:r1, None, :]
        c = None if counts is None else (counts if counts.shape[0] == 1 else counts[r0:r1])
        s = scale[r0:r1, k0:k1, None].float()
        z = None if zero_point is None else zero_point[r0:r1, k0:k1, None].float()
        t = torch.round(v / s)
        if z is not None:
            t.add_(z)
        t.clamp_(qmin, qmax)
        if z is not None:
            t.sub_(z)
        t.mul_(s).sub_(v)
        if c is None:
            out[r0:r1, k0:k1] = torch.linalg.vector_norm(t, p, -1).pow_(p)
        else:
            out[r0:r1, k0:k1] = (t.abs_().pow_(p) * c[:, None, :]).sum(-1)
    return out


def reference_histogram(x: Tensor, range: Tensor, bins: int) -> Tensor:  # noqa: A002 - the op's argument
    """int64 counts of ``x`` in ``bins`` equal bins over ``[-range, range]`` (values outside go to
    the end bins; NaN is not allowed), computed on ``x``'s device without host synchronisation."""
    t = torch.floor(x.float().reshape(-1) * (bins / 2) / range.float())
    idx = torch.clamp(t, -bins / 2, bins / 2).long() + bins // 2
    idx = idx.clamp_(0, bins - 1)
    return torch.zeros(bins, dtype=torch.int64, device=x.device).index_add_(0, idx, torch.ones_like(idx))


def reference_fit_scale(values: Tensor, counts: Tensor | None, scale: Tensor, qmin: int, qmax: int) -> Tensor:
    """``[R]``: the least-squares scale ``sum(c v k) / sum(c k^2)`` of each row's codes
    ``k = clamp(round(v / scale), qmin, qmax)`` (the old scale where all codes are 0)."""
    v = values.float()
    c = torch.ones_like(v) if counts is None else counts.float().expand_as(v)
    k = torch.clamp(torch.round(v / scale.float()[:, None]), qmin, qmax)
    den = (c * k * k).sum(1)
    return torch.where(den > 0, (c * v * k).sum(1) / den.clamp(min=1e-30), scale.float())


for _name, _fn in (("fake_quant", reference_fake_quant), ("fake_quant_backward", reference_fake_quant_backward),
                   ("fake_quant_lsq_backward", reference_fake_quant_lsq_backward),
                   ("fake_quant_lut", reference_fake_quant_lut),
                   ("fake_quant_lut_backward", reference_fake_quant_lut_backward),
                   ("quant_error", reference_quant_error), ("fit_scale", reference_fit_scale),
                   ("histogram", reference_histogram)):
    _LIB.impl(_name, _fn, "CompositeExplicitAutograd")


# ------------------------------------------------------- fake (meta) + autograd


@torch.library.register_fake("mct_fx::fake_quant")
def _(x, scale, zero_point, qmin, qmax, axis):
    return torch.empty_like(x)


@torch.library.register_fake("mct_fx::fake_quant_backward")
def _(grad, x, scale, zero_point, qmin, qmax, axis):
    return torch.empty_like(x)


@torch.library.register_fake("mct_fx::fake_quant_lsq_backward")
def _(grad, x, scale, zero_point, qmin, qmax, axis):
    return torch.empty_like(x), torch.empty_like(scale), torch.empty_like(zero_point)


@torch.library.register_fake("mct_fx::fake_quant_lut")
def _(x, centers, scale, axis):
    return torch.empty_like(x)


@torch.library.register_fake("mct_fx::fake_quant_lut_backward")
def _(grad, x, centers, scale, axis):
    return torch.empty_like(x)


@torch.library.register_fake("mct_fx::histogram")
def _(x, range, bins):  # noqa: A002
    return x.new_empty((bins,), dtype=torch.int64)


@torch.library.register_fake("mct_fx::fit_scale")
def _(values, counts, scale, qmin, qmax):
    return scale.new_empty(scale.shape, dtype=torch.float32)


@torch.library.register_fake("mct_fx::quant_error")
def _(values, counts, scale, zero_point, qmin, qmax, p):
    return scale.new_empty(scale.shape, dtype=torch.float32)


def _fq_setup(ctx, inputs, output):
    x, scale, zero_point, qmin, qmax, axis = inputs
    ctx.save_for_backward(x, scale, zero_point)
    ctx.grid = (qmin, qmax, axis)


def _fq_backward(ctx, grad):
    x, scale, zero_point = ctx.saved_tensors
    qmin, qmax, axis = ctx.grid
    _, wants_s, wants_z = ctx.needs_input_grad[:3]
    if wants_s or wants_z:
        gx, gs, gz = torch.ops.mct_fx.fake_quant_lsq_backward(grad, x, scale, zero_point, qmin, qmax, axis)
        return gx, gs if wants_s else None, gz if wants_z else None, None, None, None
    gx = torch.ops.mct_fx.fake_quant_backward(grad, x, scale, zero_point, qmin, qmax, axis)
    return gx, None, None, None, None, None


def _lut_setup(ctx, inputs, output):
    x, centers, scale, axis = inputs
    ctx.save_for_backward(x, centers, scale)
    ctx.axis = axis


def _lut_backward(ctx, grad):
    x, centers, scale = ctx.saved_tensors
    return torch.ops.mct_fx.fake_quant_lut_backward(grad, x, centers, scale, ctx.axis), None, None, None


_BACKEND = _extension.load_kernels()
if "cpp" not in _BACKEND.split("+"):
    # the compiled library registers the same rules in C++ (csrc/autograd.cpp: a third of the
    # host time per forward + backward); the reference backend uses these
    torch.library.register_autograd("mct_fx::fake_quant", _fq_backward, setup_context=_fq_setup)
    torch.library.register_autograd("mct_fx::fake_quant_lut", _lut_backward, setup_context=_lut_setup)


# ------------------------------------------------------------------ public API


def backend() -> str:
    """Which implementation runs the ops on CPU: ``"cpp"`` (fused kernels) or ``"reference"`` (pure torch)."""
    return _BACKEND


def fake_quant(x: Tensor, scale: Tensor, zero_point: Tensor, qmin: int, qmax: int,
               axis: int | None = None) -> Tensor:
    """Quantize-dequantize ``x`` (per-tensor when ``axis`` is None, else per-channel along ``axis``).

    ``scale`` (float, > 0) and ``zero_point`` (integer-valued float) are tensors, scalar
    or of length ``x.shape[axis]``, so no host synchronisation is needed.
    """
    return torch.ops.mct_fx.fake_quant(x, scale, zero_point, qmin, qmax, axis)


def fake_quant_lut(x: Tensor, centers: Tensor, scale: Tensor, axis: int | None = None) -> Tensor:
    """Non-uniform (look-up table) fake quantize: nearest of ``centers`` times ``scale``."""
    return torch.ops.mct_fx.fake_quant_lut(x, centers, scale, axis)


def quant_error(values: Tensor, counts: Tensor | None, scale: Tensor, zero_point: Tensor | None,
                qmin: int, qmax: int, p: float = 2.0) -> Tensor:
    """Error of every candidate grid on every row, ``[R, K]`` (see :func:`reference_quant_error`);
    the fused CPU kernel evaluates it in one pass per row and candidate."""
    return torch.ops.mct_fx.quant_error(values, counts, scale, zero_point, qmin, qmax, float(p))


def histogram(x: Tensor, range: Tensor, bins: int) -> Tensor:  # noqa: A002
    """Counts of ``x`` in ``bins`` equal bins over ``[-range, range]`` (see :func:`reference_histogram`);
    the CPU kernel bins in parallel (``torch.histc`` is single-threaded and ~10x slower)."""
    return torch.ops.mct_fx.histogram(x, range, bins)


def fit_scale(values: Tensor, counts: Tensor | None, scale: Tensor, qmin: int, qmax: int) -> Tensor:
    """Least-squares scale of each row's codes under ``scale`` (see :func:`reference_fit_scale`)."""
    return torch.ops.mct_fx.fit_scale(values, counts, scale, qmin, qmax)


def decompositions() -> dict:
    """``torch.export``'s default decompositions plus ours: the fake-quant ops as their pure-aten
    reference (``round``/``clamp``/...), for backends that do not know ``torch.ops.mct_fx``::

        program = torch.export.export(qmodel, (x,)).run_decompositions(mct_fx.kernels.decompositions())
    """
    table = torch.export.default_decompositions()
    table[torch.ops.mct_fx.fake_quant.default] = reference_fake_quant
    table[torch.ops.mct_fx.fake_quant_lut.default] = reference_fake_quant_lut
    return table
