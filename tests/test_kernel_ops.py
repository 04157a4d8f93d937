"""The fused ops against the pure-torch reference, bit for bit, on every scheme, dtype, layout and axis."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mct_fx import kernels
from mct_fx.quantizers.params import int_range

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
LAYOUTS = ["contiguous", "transposed", "channels_last", "sliced"]
# the fused kernels of every device present run against the reference computed on the CPU
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _layout(x: torch.Tensor, layout: str) -> torch.Tensor:
    if layout == "transposed" and x.dim() >= 2:
        return x.transpose(0, -1).contiguous().transpose(0, -1)  # dense, not contiguous
    if layout == "channels_last" and x.dim() == 4:
        return x.contiguous(memory_format=torch.channels_last)
    if layout == "sliced" and x.dim() >= 1 and x.shape[-1] > 0:
        wide = torch.cat([x, x], -1)
        return wide[..., ::2]  # overlapping-free but not dense: the kernel copies it
    return x


@st.composite
def cases(draw):
    shape = draw(st.lists(st.integers(0, 5), min_size=0, max_size=4))
    dtype = draw(st.sampled_from(DTYPES))
    layout = draw(st.sampled_from(LAYOUTS))
    axis = draw(st.none() | st.integers(0, max(0, len(shape) - 1))) if shape else None
    scheme = draw(st.sampled_from(["signed", "unsigned", "uniform"]))
    n_bits = draw(st.integers(2, 16))
    seed = draw(st.integers(0, 2**16))
    device = draw(st.sampled_from(DEVICES))
    return shape, dtype, layout, axis, scheme, n_bits, seed, device


def _make(shape, dtype, layout, axis, scheme, n_bits, seed, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    channels = shape[axis] if axis is not None else 1
    scale = torch.rand(channels, generator=g) * 0.2 + 1e-3
    qmin, qmax = int_range(n_bits, scheme == "signed")
    zp = torch.randint(qmin, qmax + 1, (channels,), generator=g).float() if scheme == "uniform" else torch.zeros(
        channels)
    if axis is None:
        scale, zp = scale[0], zp[0]
    x = torch.randn(shape, generator=g) * (float(scale.max()) if scale.numel() else 1.0) * 2 ** (n_bits - 1) * 1.5
    flat = x.view(-1)
    if flat.numel():
        s = float(scale.reshape(-1)[0])
        specials = torch.tensor([0.5 * s, 1.5 * s, -2.5 * s, 1e30, -1e30, float("inf"), float("-inf"),
                                 float("nan"), 0.0, -0.0])
        k = min(flat.numel(), specials.numel())
        flat[:k] = specials[:k]  # rounding boundaries, far outside, infinities, NaN, signed zeros
    return _layout(x.to(dtype), layout).to(device), scale.to(device), zp.to(device), qmin, qmax


def _cpu(*tensors):
    return [t.cpu() for t in tensors]


def _same(a: torch.Tensor, b: torch.Tensor):
    a, b = a.cpu(), b.cpu()
    assert a.shape == b.shape and a.dtype == b.dtype
    torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)
    numbers = ~torch.isnan(a)  # a NaN's sign bit is not a value (bfloat16 conversions differ there)
    assert torch.equal(torch.signbit(a[numbers]), torch.signbit(b[numbers]))  # +0.0 and -0.0 too


@settings(max_examples=300, deadline=None)
@given(cases())
def test_forward_and_ste_backward_bit_identical(case):
    x, scale, zp, qmin, qmax = _make(*case)
    axis = case[3]
    _same(torch.ops.mct_fx.fake_quant(x, scale, zp, qmin, qmax, axis),
          kernels.reference_fake_quant(*_cpu(x, scale, zp), qmin, qmax, axis))
    grad = torch.randn(x.shape).to(x.dtype).to(x.device)
    _same(torch.ops.mct_fx.fake_quant_backward(grad, x, scale, zp, qmin, qmax, axis),
          kernels.reference_fake_quant_backward(*_cpu(grad, x, scale, zp), qmin, qmax, axis))


@settings(max_examples=200, deadline=None)
@given(cases())
def test_lsq_backward_matches_reference(case):
    x, scale, zp, qmin, qmax = _make(*case)
    axis = case[3]
    grad = torch.randn(x.shape).to(x.dtype).to(x.device)
    ours = torch.ops.mct_fx.fake_quant_lsq_backward(grad, x, scale, zp, qmin, qmax, axis)
    ref = kernels.reference_fake_quant_lsq_backward(*_cpu(grad, x, scale, zp), qmin, qmax, axis)
    _same(ours[0], ref[0])
    for a, b in zip(ours[1:], ref[1:], strict=True):
        assert a.shape == b.shape
        torch.testing.assert_close(a.cpu(), b, rtol=1e-6, atol=1e-6)  # float64 sums, another order


@settings(max_examples=200, deadline=None)
@given(cases(), st.integers(1, 16))
def test_lut_bit_identical(case, n_centers):
    x, scale, _, _, _ = _make(*case)
    axis = case[3]
    g = torch.Generator().manual_seed(case[-2])
    centers = (torch.randn(n_centers, generator=g) * 100).to(x.device)  # unsorted on purpose
    _same(torch.ops.mct_fx.fake_quant_lut(x, centers, scale, axis),
          kernels.reference_fake_quant_lut(*_cpu(x, centers, scale), axis))
    grad = torch.randn(x.shape).to(x.dtype).to(x.device)
    _same(torch.ops.mct_fx.fake_quant_lut_backward(grad, x, centers, scale, axis),
          kernels.reference_fake_quant_lut_backward(*_cpu(grad, x, centers, scale), axis))


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_large_outputs_bit_identical(layout):
    """Outputs above 4 MiB take the huge-page allocation path of the CPU kernels (the hypothesis cases are small)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 32, 96, 96, generator=g) * 3  # 9.4 MB
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    scale, zp = torch.rand(32, generator=g) * 0.02 + 0.01, torch.zeros(32)
    grad = torch.randn(x.shape, generator=g)
    for s, z, axis in ((scale, zp, 1), (scale[0], zp[0], None)):
        _same(torch.ops.mct_fx.fake_quant(x, s, z, -128, 127, axis),
              kernels.reference_fake_quant(x, s, z, -128, 127, axis))
        _same(torch.ops.mct_fx.fake_quant_backward(grad, x, s, z, -128, 127, axis),
              kernels.reference_fake_quant_backward(grad, x, s, z, -128, 127, axis))
        _same(torch.ops.mct_fx.fake_quant_lsq_backward(grad, x, s, z, -128, 127, axis)[0],
              kernels.reference_fake_quant_lsq_backward(grad, x, s, z, -128, 127, axis)[0])


def test_nan_and_inf_behaviour():
    x = torch.tensor([float("nan"), float("inf"), float("-inf"), 1e30])
    y = kernels.fake_quant(x, torch.tensor(0.1), torch.tensor(0.0), -128, 127)
    assert torch.isnan(y[0]) and y[1] == 12.7 * 1.0 and float(y[2]) == pytest.approx(-12.8) and y[3] == y[1]
    x.requires_grad_(True)
    kernels.fake_quant(x, torch.tensor(0.1), torch.tensor(0.0), -128, 127).sum().backward()
    assert x.grad.tolist() == [0.0, 0.0, 0.0, 0.0]  # NaN and out-of-range values pass no gradient
    lut = kernels.fake_quant_lut(torch.tensor([float("nan"), float("inf"), -5.0, 0.26]),
                                 torch.tensor([-1.0, 0.0, 0.5, 1.0]), torch.tensor(1.0))
    assert torch.isnan(lut[0]) and lut[1:].tolist() == [1.0, -1.0, 0.5]


def test_lut_ties_go_to_the_lower_center():
    y = kernels.fake_quant_lut(torch.tensor([0.25, -0.5]), torch.tensor([-1.0, 0.0, 0.5, 1.0]), torch.tensor(1.0))
    assert y.tolist() == [0.0, -1.0]


def test_autograd_uses_ste_and_lsq():
    x = torch.tensor([-3.0, -0.26, 0.04, 0.5, 3.0], requires_grad=True)
    scale = torch.tensor(0.1, requires_grad=True)
    zp = torch.tensor(0.0, requires_grad=True)
    y = kernels.fake_quant(x, scale, zp, -8, 7)
    y.backward(torch.ones_like(y))
    assert x.grad.tolist() == [0.0, 1.0, 1.0, 1.0, 0.0]
    # d/ds: outside -> clamped code (-8 and 7); inside -> round(v) - v
    expected = -8 + (-3 + 2.6) + (0 - 0.4) + (5 - 5) + 7
    assert float(scale.grad) == pytest.approx(expected, abs=1e-5)
    assert float(zp.grad) == pytest.approx(-0.1 - 0.1, abs=1e-6)


def test_gradcheck_in_the_clipping_region():
    # outside the grid the op is (q_clamped - z) * s: linear in s and z, constant in x
    x = torch.tensor([[-5.0, 4.0], [6.0, -7.0]], dtype=torch.float64, requires_grad=True)
    scale = torch.tensor([0.1, 0.2], dtype=torch.float64, requires_grad=True)
    zp = torch.tensor([1.0, -1.0], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, s, z: kernels.fake_quant(a, s, z, -8, 7, 1), (x, scale, zp),
                                    eps=1e-6, atol=1e-6)


def test_backward_equals_autograd_of_the_ste_expression():
    # inside the grid the STE/LSQ gradient is the autograd gradient of the expression with round()
    # passed straight through; compare in float64
    g = torch.Generator().manual_seed(3)
    x = (torch.randn(6, 4, generator=g, dtype=torch.float64) * 0.5).requires_grad_(True)
    scale = (torch.rand(4, generator=g, dtype=torch.float64) * 0.05 + 0.02).requires_grad_(True)
    zp = torch.tensor([0.0, 3.0, -2.0, 1.0], dtype=torch.float64, requires_grad=True)
    w = torch.randn(6, 4, generator=g, dtype=torch.float64)
    (kernels.fake_quant(x, scale, zp, -16, 15, 1) * w).sum().backward()
    ours = [t.grad.clone() for t in (x, scale, zp)]
    for t in (x, scale, zp):
        t.grad = None
    v = x / scale
    r = torch.round(v).detach() + (v - v.detach())  # forward: exactly round(v); backward: identity
    q = r + zp
    q = torch.where(q < -16, -16.0, torch.where(q > 15, 15.0, q))  # codes on the ends are not clipped
    ((q - zp) * scale * w).sum().backward()
    for a, b in zip(ours, (x.grad, scale.grad, zp.grad), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_ops_compile_without_graph_breaks():
    def f(x, s, z):
        return kernels.fake_quant(x, s, z, -128, 127, 1) * 2

    x, s, z = torch.randn(2, 3, 4), torch.rand(3) + 0.1, torch.zeros(3)
    explanation = torch._dynamo.explain(f)(x, s, z)
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1
    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    assert torch.equal(compiled(x, s, z), f(x, s, z))


def test_export_sees_one_op():
    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("s", torch.tensor(0.05))
            self.register_buffer("z", torch.tensor(0.0))

        def forward(self, x):
            return kernels.fake_quant(x, self.s, self.z, -128, 127)

    ep = torch.export.export(M(), (torch.randn(4, 4),))
    targets = [n.target for n in ep.graph.nodes if n.op == "call_function"]
    assert targets == [torch.ops.mct_fx.fake_quant.default]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_kernels_are_in_use_and_quantize_runs_on_gpu():
    import mct_fx

    import zoo

    assert "cuda" in kernels.backend()
    model, side = zoo.build("resnet18")
    model = model.cuda()
    q = mct_fx.quantize(model, [b.cuda() for b in zoo.calibration(side, n_batches=2)], "imx500", verbose=False)
    x = zoo.evaluation(side, 4).cuda()
    with torch.no_grad():
        assert zoo.sqnr_db(model(x), q(x)) > 15


@settings(max_examples=60, deadline=None)
@given(rows=st.integers(1, 6), n=st.integers(1, 300), k=st.integers(1, 9), p=st.sampled_from([1.0, 2.0, 2.5]),
       weighted=st.sampled_from([None, "shared", "per_row"]), shifted=st.booleans(), n_bits=st.integers(2, 16),
       seed=st.integers(0, 2**16))
def test_quant_error_matches_reference(rows, n, k, p, weighted, shifted, n_bits, seed):
    """The fused search error equals the reference up to summation order."""
    g = torch.Generator().manual_seed(seed)
    values = torch.randn(rows, n, generator=g) * 3
    scale = torch.rand(rows, k, generator=g) * 0.2 + 1e-3
    qmin, qmax = int_range(n_bits, not shifted)
    zero_point = torch.randint(0, 5, (rows, k), generator=g).float() if shifted else None
    counts = {None: None, "shared": torch.rand(1, n, generator=g),
              "per_row": torch.rand(rows, n, generator=g)}[weighted]
    got = kernels.quant_error(values, counts, scale, zero_point, qmin, qmax, p)
    want = kernels.reference_quant_error(values, counts, scale, zero_point, qmin, qmax, p)
    assert got.shape == (rows, k)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@settings(max_examples=40, deadline=None)
@given(rows=st.integers(1, 6), n=st.integers(1, 300), weighted=st.booleans(), n_bits=st.integers(2, 16),
       seed=st.integers(0, 2**16))
def test_fit_scale_matches_reference(rows, n, weighted, n_bits, seed):
    g = torch.Generator().manual_seed(seed)
    values = torch.randn(rows, n, generator=g)
    values[0] = 0  # a row whose codes are all zero keeps its scale
    scale = torch.rand(rows, generator=g) * 0.1 + 1e-3
    counts = torch.rand(rows, n, generator=g) if weighted else None
    qmin, qmax = int_range(n_bits, True)
    got = kernels.fit_scale(values, counts, scale, qmin, qmax)
    want = kernels.reference_fit_scale(values, counts, scale, qmin, qmax)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
    assert got[0] == scale[0]
