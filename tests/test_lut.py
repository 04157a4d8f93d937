"""Look-up-table (k-means) quantizers: fitting, the TPC route, accuracy against uniform grids, state, export."""

import math
from dataclasses import replace

import pytest
import torch

import mct_fx
from mct_fx import demo
from mct_fx.export import ExportError, export_onnx
from mct_fx.quantizers import LutActivationQuantizer, LutWeightQuantizer, QuantMethod, WeightQuantizer
from mct_fx.quantizers.lut import kmeans_1d, lut_centers
from mct_fx.tpc import TPCError, get_tpc
from mct_fx.tpc.derive import with_bits
from mct_fx.tpc.schema import AttributeQuantConfig, OpQuantConfig


@pytest.fixture(scope="module")
def trained():
    model = demo.load_model()
    calib, test, _ = demo.load_samples()
    return model, list(calib[:128].split(32)), list(test[:256].split(64))


def _sqnr(model, qmodel, batches):
    with torch.no_grad():
        ref = torch.cat([model(b) for b in batches])
        out = torch.cat([qmodel(b) for b in batches])
    return 10 * math.log10(ref.pow(2).mean() / (out - ref).pow(2).mean())


def test_kmeans_finds_clusters_and_keeps_zero():
    g = torch.Generator().manual_seed(0)
    values = torch.cat([torch.randn(500, generator=g) * 0.01 + m for m in (-0.7, 0.2, 0.6)])
    centres = kmeans_1d(values, torch.ones_like(values), 4)
    assert 0.0 in centres.tolist()
    others = [c for c in centres.tolist() if c != 0.0]
    assert others == pytest.approx([-0.7, 0.2, 0.6], abs=0.01)


def test_lut_centers_are_an_8bit_table_with_zero():
    g = torch.Generator().manual_seed(0)
    values = torch.randn(10000, generator=g).clamp(-3, 3) / 3
    table = lut_centers(values, torch.ones_like(values), 3, signed=True)
    assert table.numel() == 8 and 0.0 in table.tolist()
    assert torch.equal(table * 128, torch.round(table * 128)) and table.min() >= -1 and table.max() < 1
    assert torch.all(table[1:] >= table[:-1])
    with pytest.raises(ValueError, match="2..7 bits"):
        lut_centers(values, torch.ones_like(values), 8, signed=True)


@pytest.mark.parametrize("bits", [3, 4])
def test_lut_weights_beat_uniform_on_trained_kernels(trained, bits):
    model = trained[0]
    for name in ("conv2", "conv4", "conv5"):
        w = getattr(model, name).weight.detach()
        lut = LutWeightQuantizer("lut_symmetric", bits, channels=w.shape[0])
        uni = WeightQuantizer("symmetric", bits, channels=w.shape[0])
        lut.freeze(w)
        uni.freeze(w)  # MSE threshold search
        err_lut, err_uni = (lut(w) - w).pow(2).sum(), (uni(w) - w).pow(2).sum()
        assert err_lut < err_uni, (name, float(err_lut), float(err_uni))


def test_lut_w4_through_the_target_shares_one_fitted_table_per_layer(trained):
    """What the IMX500 runs: one table per layer, a threshold per channel; the k-means table beats
    evenly spaced levels on the same thresholds."""
    model, calib, test = trained
    lut = mct_fx.quantize(model, calib, with_bits(get_tpc("imx500_lut"), weights=4), verbose=False)
    q = lut.conv2_weight_quant
    assert isinstance(q, LutWeightQuantizer) and q.n_bits == 4
    assert q.centers.shape == (16,) and q.scale.shape == (model.conv2.out_channels,)
    fitted = _sqnr(model, lut, test)
    even = torch.arange(-8, 8) / 8.0  # the signed 4-bit grid in threshold units
    for m in lut.modules():
        if isinstance(m, LutWeightQuantizer):
            m.centers = even.clone()
    assert fitted > _sqnr(model, lut, test) + 1.0


def _activations(tpc, method, bits):
    """``tpc`` with every quantized activation on ``method`` / ``bits``."""

    def swap(options):
        if options is None:
            return None
        cands = tuple(replace(c, activation_method=method, activation_n_bits=bits)
                      if c.enable_activation_quantization else c for c in options.candidates)
        base = cands[options.candidates.index(options.base)]
        return replace(options, candidates=cands, base=base)

    sets = tuple(replace(s, options=swap(s.options)) for s in tpc.operator_sets)
    return replace(tpc, name=f"{tpc.name}_{method}{bits}", default_options=swap(tpc.default_options),
                   operator_sets=sets)


def test_lut_activations_beat_power_of_two_at_3_bits(trained):
    model, calib, test = trained
    lut_tpc = _activations(get_tpc("imx500"), "lut_pot", 3)
    lut = mct_fx.quantize(model, calib, lut_tpc, verbose=False)
    pot = mct_fx.quantize(model, calib, _activations(get_tpc("imx500"), "power_of_two", 3), verbose=False)
    assert isinstance(lut.relu1_act_quant, LutActivationQuantizer)
    table = lut.relu1_act_quant.centers
    assert table.min() == 0 and table.numel() == 8  # unsigned: after a ReLU every centre is >= 0
    assert torch.unique(table).numel() == 8  # no centre wasted on a duplicate
    assert _sqnr(model, lut, test) > _sqnr(model, pot, test) + 2.0


def test_lut_state_dict_round_trip(trained):
    model, calib, test = trained
    tpc = with_bits(get_tpc("imx500_lut"), weights=2)
    qmodel = mct_fx.quantize(model, calib, tpc, verbose=False)
    fresh = mct_fx.prepare(model, calib[0], tpc)
    fresh.load_state_dict(qmodel.state_dict())
    with torch.no_grad():
        assert torch.equal(fresh(test[0]), qmodel(test[0]))


def test_lut_bits_are_validated():
    with pytest.raises(TPCError, match="n_bits: look-up-table methods take 2..7 bits"):
        AttributeQuantConfig(method=QuantMethod.LUT_POT, n_bits=8, enabled=True)
    with pytest.raises(TPCError, match="activation_n_bits: look-up-table"):
        OpQuantConfig(activation_method="lut_symmetric", activation_n_bits=8)


def test_export_of_lut_models(trained, tmp_path):
    model, calib, test = trained
    qmodel = mct_fx.quantize(model, calib, with_bits(get_tpc("imx500_lut"), weights=4), verbose=False)
    with pytest.warns(UserWarning, match="dequantized"):
        result = export_onnx(qmodel, test[0], tmp_path / "lut.onnx")
    assert result.agreement.faithful
    act = mct_fx.quantize(model, calib, _activations(get_tpc("imx500"), "lut_pot", 4), verbose=False)
    with pytest.raises(ExportError, match="no QDQ form"):
        export_onnx(act, test[0], tmp_path / "lut_act.onnx")
