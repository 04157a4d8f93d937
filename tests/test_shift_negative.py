"""Shift-negative correction: the shifted grid, where it applies, and that it helps."""

import pytest
import torch
from torch import nn

import mct_fx
from mct_fx.passes.shift_negative import shiftable_quantizers
from mct_fx.quantizers import ActivationQuantizer
from mct_fx.quantizers.params import shift_negative_params

import zoo


def test_shifted_grid_hand_values():
    scale, zp = shift_negative_params(torch.tensor(8.0), torch.tensor(-0.278), 8)
    assert float(scale) == 8 / 256 and float(zp) == 9  # 9 steps = 0.28125 >= 0.278


def _silu_like(n=20000):
    return nn.functional.silu(torch.randn(n) * 3)  # min -0.278, max ~12


def test_activation_quantizer_uses_shifted_grid_when_tail_is_small():
    x = _silu_like()
    plain, shifted = ActivationQuantizer("power_of_two", 8), ActivationQuantizer("power_of_two", 8)
    plain(x), shifted(x)
    plain.freeze()
    shifted.freeze(shift_negative_ratio=0.05)
    assert plain.signed and float(plain.zero_point) == 0
    assert not shifted.signed and float(shifted.zero_point) > 0 and (shifted.qmin, shifted.qmax) == (0, 255)
    assert float(shifted.scale) == float(plain.scale) / 2  # same threshold, twice the resolution
    lo, _ = shifted.grid_range()
    assert float(lo) <= float(x.min())  # the negative tail is still representable
    err = {n: float((q(x) - x).pow(2).mean()) for n, q in (("plain", plain), ("shifted", shifted))}
    assert err["shifted"] < 0.5 * err["plain"]
    # a tail larger than the ratio allows keeps the signed grid
    big_tail = ActivationQuantizer("power_of_two", 8)
    big_tail(x - 1.0)
    big_tail.freeze(shift_negative_ratio=0.05)
    assert big_tail.signed
    # a TPC-forced signedness is never overridden
    forced = ActivationQuantizer("power_of_two", 8, signed=True)
    forced(x)
    forced.freeze(shift_negative_ratio=0.05)
    assert forced.signed and float(forced.zero_point) == 0


class Consumers(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv0 = nn.Conv2d(3, 8, 3, padding=1)
        self.act_conv = nn.SiLU()
        self.pool = nn.MaxPool2d(2)
        self.conv1 = nn.Conv2d(8, 8, 3, padding=1)
        self.act_mul = nn.Hardswish()
        self.act_up = nn.GELU()
        self.up = nn.ConvTranspose2d(8, 4, 2, stride=2)
        self.avg = nn.AvgPool2d(3, stride=1, padding=1)
        self.act_avg = nn.SiLU()
        self.conv2 = nn.Conv2d(4, 4, 1)

    def forward(self, x):
        a = self.conv1(self.pool(self.act_conv(self.conv0(x))))  # SiLU -> maxpool -> conv: absorbable
        b = self.act_mul(a) * a  # Hardswish -> mul: not absorbable
        c = self.up(self.act_up(b))  # GELU -> transposed conv: not absorbable
        return self.conv2(self.avg(self.act_avg(c)))  # SiLU -> padded avgpool -> conv: not absorbable


@pytest.mark.parametrize("method", ["power_of_two", "symmetric"])
def test_shift_search_is_no_worse_than_the_default_shift(method):
    x = _silu_like()
    default, searched = ActivationQuantizer(method, 8), ActivationQuantizer(method, 8)
    default(x), searched(x)
    default.freeze(shift_negative_ratio=0.05)
    searched.freeze(shift_negative_ratio=0.05, shift_negative_search=True)
    assert not searched.signed and float(searched.zero_point) > 0
    err = {n: float((q(x) - x).pow(2).mean()) for n, q in (("default", default), ("searched", searched))}
    assert err["searched"] <= err["default"] * 1.001, err


def test_shiftable_quantizers_follow_the_consumers():
    gm = mct_fx.prepare(Consumers().eval(), torch.randn(2, 3, 8, 8), "imx500")
    assert shiftable_quantizers(gm) == {"act_conv_act_quant"}


def _silu_network() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32), nn.SiLU(),
                          nn.Conv2d(32, 32, 3, padding=1), nn.BatchNorm2d(32), nn.SiLU(),
                          nn.Conv2d(32, 8, 3, padding=1))
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):  # wide pre-activation ranges: thresholds of 8, tails well under 5%
            m.weight.data.fill_(3.0)
    zoo.reestimate_bn(model, 16)
    return model


def test_snc_improves_a_silu_network():
    model = _silu_network()
    calib, x = zoo.calibration(16, n_batches=4), zoo.evaluation(16, n=64)
    with torch.no_grad():
        ref = model(x)
        with_snc = mct_fx.quantize(model, calib, "imx500", verbose=False)
        without = mct_fx.quantize(model, calib, "imx500", mct_fx.QuantConfig(shift_negative_correction=False),
                                  verbose=False)
        gain = zoo.sqnr_db(ref, with_snc(x)) - zoo.sqnr_db(ref, without(x))
    shifted = [n for n, m in with_snc.named_modules() if isinstance(m, ActivationQuantizer) and m.zero_point != 0]
    assert shifted == ["_2_act_quant", "_5_act_quant"]
    assert gain > 1.0


def test_explicit_shift_keeps_the_function():
    """The add + unsigned grid + bias/padding form (for formats without zero points) computes what the
    shifted grid does, up to values on a rounding boundary of the 16-bit grid before the add."""
    import copy

    from mct_fx.passes.explicit_shift import explicit_shift

    model = _silu_network()
    calib, x = zoo.calibration(16, n_batches=4), zoo.evaluation(16, n=64)
    qmodel = mct_fx.quantize(model, calib, "imx500", verbose=False)
    explicit = copy.deepcopy(qmodel)
    assert explicit_shift(explicit) == ["_2_act_quant", "_5_act_quant"]
    assert float(explicit._2_act_quant.zero_point) == 0 and explicit._2_act_quant_wide.n_bits == 16
    assert float(qmodel._2_act_quant.zero_point) > 0  # the copy only
    assert "pad" in explicit.code  # the next convs pad with the shift
    with torch.no_grad():
        ref, out = qmodel(x), explicit(x)
    step = float(qmodel._6_act_quant.scale)
    assert float(((out - ref).abs() <= step * 1.0001).float().mean()) >= 0.99
    assert zoo.sqnr_db(ref, out) > 30
