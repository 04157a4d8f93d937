"""Threshold search: properties, vectorisation, histogram."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mct_fx.quantizers import ActivationQuantizer, StreamingHistogram, WeightQuantizer
from mct_fx.quantizers.params import int_range
from mct_fx.quantizers.search import ErrorMethod, quant_error, search_params

METHODS = ["power_of_two", "symmetric", "uniform"]


def _mse(x, scale, zp, n_bits, signed, method):
    qmin, qmax = int_range(n_bits, signed and method != "uniform")
    z = zp if method == "uniform" else None
    return float(quant_error(x, None, scale[:, None], None if z is None else z[:, None], qmin, qmax)[0, 0])


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), n_bits=st.sampled_from([2, 4, 8]), method=st.sampled_from(METHODS),
       heavy=st.booleans())
def test_mse_never_worse_than_noclipping(seed, n_bits, method, heavy):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 500, generator=g)
    if heavy:
        x = x ** 3  # heavy tails: clipping pays off
    lo, hi = x.amin(1), x.amax(1)
    s0, z0 = search_params(x, None, lo, hi, method, n_bits, True, "noclipping")
    s1, z1 = search_params(x, None, lo, hi, method, n_bits, True, "mse")
    assert _mse(x, s1, z1, n_bits, True, method) <= _mse(x, s0, z0, n_bits, True, method) * (1 + 1e-6)


@settings(max_examples=25, deadline=None)
@given(maxabs=st.floats(1e-3, 1e3), signed=st.booleans())
def test_noclipping_pot_threshold_covers_max(maxabs, signed):
    x = torch.tensor([[0.0, maxabs, -maxabs if signed else 0.0]])
    scale, _ = search_params(x, None, x.amin(1), x.amax(1), "power_of_two", 8, signed, "noclipping")
    threshold = float(scale) * (128 if signed else 256)
    assert threshold >= maxabs * (1 - 1e-6)
    assert threshold < 2 * maxabs * (1 + 1e-6)
    assert threshold == 2.0 ** round(torch.log2(torch.tensor(threshold)).item())


def test_mse_clips_heavy_tails():
    x = (torch.randn(10_000) ** 3)[None]
    s_nc, _ = search_params(x, None, x.amin(1), x.amax(1), "symmetric", 4, True, "noclipping")
    s, _ = search_params(x, None, x.amin(1), x.amax(1), "symmetric", 4, True, "mse")
    assert float(s) < 0.7 * float(s_nc)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("error", ["mse", "mae", "lp", "kl"])
def test_vectorised_rows_equal_row_by_row(method, error):
    w = torch.randn(6, 300) * torch.logspace(-2, 1, 6)[:, None]
    s_all, z_all = search_params(w, None, w.amin(1), w.amax(1), method, 4, True, error, p=3.0)
    for i in range(6):
        row = w[i:i + 1]
        s, z = search_params(row, None, row.amin(1), row.amax(1), method, 4, True, error, p=3.0)
        assert torch.allclose(s, s_all[i:i + 1]) and torch.equal(z, z_all[i:i + 1])


def test_counts_weigh_values():
    # the same values, but the outlier carries almost no weight: clipping it must win
    x = torch.cat([torch.linspace(-1, 1, 101), torch.tensor([20.0])])[None]
    w = torch.cat([torch.ones(101), torch.tensor([1e-6])])[None]
    s, _ = search_params(x, w, x.amin(1), x.amax(1), "symmetric", 8, True, "mse")
    assert float(s) * 128 < 2.0


def test_histogram_range_doubling_is_exact():
    a, b = torch.rand(1000) * 0.3, torch.randn(1000) * 5
    h1 = StreamingHistogram(bins_per_side=256)
    h1.update(a)
    h1.update(b)  # forces the range to grow
    # the same data all at once, on the final range, gives the same counts
    h2 = StreamingHistogram(bins_per_side=256)
    h2.update(torch.cat([b, a]))
    assert float(h1.range) == float(h2.range)
    assert int(h1.counts.sum()) == 2000
    # bins merged from a finer grid agree with direct binning up to edge rounding
    assert (h1.counts - h2.counts).abs().sum() <= 4
    assert float(h1.min) == float(torch.cat([a, b]).min()) and float(h1.max) == float(torch.cat([a, b]).max())


def test_histogram_kernel_matches_reference():
    """The parallel CPU binning equals the reference bin for bin, edges and +-inf included."""
    from mct_fx import kernels

    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.randn(300_000, generator=g) * 3, torch.arange(-16, 16.5, 0.5),
                   torch.tensor([16.0, -16.0, float("inf"), -float("inf")])])
    r = torch.tensor(16.0)
    for bins in (2, 512, 8192):
        got, want = kernels.histogram(x, r, bins), kernels.reference_histogram(x, r, bins)
        assert got.dtype == torch.int64 and int(got.sum()) == x.numel()
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_activation_quantizer_signedness_and_state():
    q = ActivationQuantizer("power_of_two", 8)
    q(torch.rand(100) * 3)
    q.freeze()
    assert q.signed is False and q.qmin == 0 and q.qmax == 255
    assert float(q.scale) * 256 == 4.0  # unsigned threshold 4 covers 3
    q2 = ActivationQuantizer("power_of_two", 8)
    q2(torch.randn(100))
    q2.freeze(ErrorMethod.NOCLIPPING)
    assert q2.signed is True and q2.qmin == -128


def test_weight_quantizer_per_channel_and_importance():
    w = torch.randn(8, 4, 3, 3)
    q = WeightQuantizer("symmetric", 8, channels=8, axis=0)
    q.freeze(w)
    err = (q(w) - w).abs().amax((1, 2, 3))
    assert torch.all(err <= q.scale * 0.5 + 1e-7)  # per-channel: every channel within half a step
    # an outlier in channel 0 that carries no importance gets clipped; with importance it is covered
    w[0] = torch.linspace(-1, 1, 36).reshape(4, 3, 3)
    w[0, 0, 0, 0] = 10.0
    imp = torch.ones_like(w)
    imp[0, 0, 0, 0] = 0.0
    q2 = WeightQuantizer("symmetric", 4, channels=8, axis=0)
    q2.freeze(w, importance=imp)
    q3 = WeightQuantizer("symmetric", 4, channels=8, axis=0)
    q3.freeze(w)
    assert float(q2.scale[0]) * 8 < 1.5 < float(q3.scale[0]) * 8


def test_quantizer_requires_grid_before_frozen():
    q = ActivationQuantizer("symmetric", 8)
    with pytest.raises(RuntimeError, match="no grid"):
        q.set_mode("frozen")
    with pytest.raises(RuntimeError, match="saw no data"):
        q.freeze()


def test_sampled_histogram_thresholds_are_as_good():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 56, 56, 8, generator=g).relu() * torch.rand(8, generator=g)  # channel-dependent ranges
    x.view(-1)[torch.randint(0, x.numel(), (2000,), generator=g)] *= 12  # a sparse heavy tail
    x.view(-1)[7] = 40.0  # a single outlier: min/max stay exact whatever is sampled
    for method in ("power_of_two", "symmetric", "uniform"):
        full, sampled = ActivationQuantizer(method, 8), ActivationQuantizer(method, 8)
        full.observer.max_samples, sampled.observer.max_samples = x.numel(), 100_000
        for q in (full, sampled):
            q(x)
            q(x.flip(0))
        assert int(sampled.observer.counts.sum()) < 300_000 and float(sampled.observer.max) == 40.0
        for q in (full, sampled):
            q.freeze()
        mse = {n: float((q(x) - x).pow(2).mean()) for n, q in (("full", full), ("sampled", sampled))}
        assert mse["sampled"] <= 1.05 * mse["full"], (method, mse)
