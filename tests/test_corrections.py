"""Corrections around the threshold search: each keeps the float function and helps where it should."""

import math

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import mct_fx
from mct_fx.passes import fold_batchnorm, functionalize_layers
from mct_fx.passes.relu_bound import POT_BOUND, bound_relus_to_power_of_two
from mct_fx.quantizers.clamp import BoundedReLU
from mct_fx.quantizers.histogram import StreamingHistogram, z_score_filter
from mct_fx.tpc import get_tpc
from mct_fx.tpc.derive import with_bits
from mct_fx.tpc.matching import annotate
from mct_fx.trace import trace

import zoo


def _sqnr(model, qmodel, batches):
    with torch.no_grad():
        ref = torch.cat([model(b) for b in batches])
        out = torch.cat([qmodel(b) for b in batches])
    return 10 * math.log10(ref.pow(2).mean() / (out - ref).pow(2).mean())


def _quantized_sqnr(model, calib, evaluation, tpc="imx500", **config):
    qmodel = mct_fx.quantize(model, calib, tpc, mct_fx.QuantConfig(**config), verbose=False)
    return _sqnr(model, qmodel, evaluation)


class ReLU6Net(nn.Module):
    """conv -> ReLU6 -> conv chains (module and functional ReLU6, a bounded Hardtanh, max-pooling between)."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 16, 3, padding=1)
        self.c2 = nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.c3 = nn.Conv2d(16, 16, 1)
        self.c4 = nn.Conv2d(16, 16, 3, padding=1)
        self.c5 = nn.Conv2d(16, 8, 1)
        self.act = nn.ReLU6()
        with torch.no_grad():
            for c in (self.c1, self.c2, self.c3, self.c4):
                c.weight.mul_(3)

    def forward(self, x):
        y = self.act(self.c1(x))
        y = F.relu6(self.c2(y))
        y = self.c4(F.max_pool2d(F.hardtanh(self.c3(y), 0.0, 3.0), 2))  # through max-pooling
        return self.c5(self.act(y))


def _annotated(model, x, tpc="imx500"):
    gm = trace(model, ((x,), {}))
    functionalize_layers(gm)
    fold_batchnorm(gm)
    annotate(gm, get_tpc(tpc))
    return gm


def test_relu_bound_keeps_float_function_and_bounds_at_power_of_two():
    torch.manual_seed(0)
    model = ReLU6Net().eval()
    x = torch.randn(4, 3, 16, 16)
    gm = _annotated(model, x)
    assert bound_relus_to_power_of_two(gm) == 4
    bounds = [m.max_val for m in gm.modules() if isinstance(m, BoundedReLU)]
    assert bounds == [POT_BOUND * 255 / 256] * 4
    with torch.no_grad():
        assert torch.allclose(gm(x), model(x), atol=1e-5)


def _with_and_without(model_cls, **switch):
    """W8A8 SQNR of a seeded ``model_cls`` on random images with ``switch``, and without it."""
    torch.manual_seed(0)
    model = model_cls().eval()
    calib = [torch.randn(16, 3, 16, 16) for _ in range(4)]
    evaluation = [torch.randn(16, 3, 16, 16) for _ in range(2)]
    off = {k: mct_fx.QuantConfig.__dataclass_fields__[k].default for k in switch}
    if switch == off:  # a default-on switch: compare with it turned off
        off = {k: not v if isinstance(v, bool) else math.inf for k, v in switch.items()}
    return _quantized_sqnr(model, calib, evaluation, **switch), _quantized_sqnr(model, calib, evaluation, **off)


def test_relu_bound_improves_pot_activations():
    on, off = _with_and_without(ReLU6Net, relu_bound_to_power_of_2=True)
    assert on > off + 0.3, (on, off)
    gm = _annotated(ReLU6Net().eval(), torch.randn(2, 3, 16, 16), "int8")
    assert bound_relus_to_power_of_two(gm) == 0  # no power-of-two grid to fill


def test_z_threshold_ignores_injected_outliers():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10)).eval()
    calib = [torch.randn(8, 3, 16, 16) for _ in range(4)]
    calib[1][3, :, 5, 5] = 300.0  # one corrupted pixel in one calibration image
    evaluation = [torch.randn(8, 3, 16, 16) for _ in range(2)]
    off = _quantized_sqnr(model, calib, evaluation, z_threshold=math.inf)
    on = _quantized_sqnr(model, calib, evaluation, z_threshold=8.0)
    assert on > off + 5.0, (on, off)


def test_z_score_filter_narrows_the_range():
    h = StreamingHistogram()
    h.update(torch.cat([torch.randn(10000), torch.tensor([50.0])]))
    centres, counts = h.centres_and_counts()
    c, n, lo, hi = z_score_filter(centres, counts, h.min, h.max, 6.0)
    assert float(hi) < 10 and float(lo) == float(h.min) and n.sum() == counts.sum() - 1
    assert c.numel() == n.numel()


class SoftmaxHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Linear(8, 10)
        with torch.no_grad():
            self.fc.bias.fill_(12.0)  # logits far from zero: a symmetric grid wastes its negative half

    def forward(self, x):
        return torch.softmax(self.fc(F.relu(self.conv(x)).mean((2, 3))), dim=-1)


def test_softmax_shift_recentres_logits():
    torch.manual_seed(0)
    model = SoftmaxHead().eval()
    calib = [torch.randn(8, 3, 16, 16) for _ in range(4)]
    evaluation = [torch.randn(8, 3, 16, 16) for _ in range(2)]
    qmodel = mct_fx.quantize(model, calib, "imx500", mct_fx.QuantConfig(softmax_shift=True), verbose=False)
    assert float(qmodel.fc.bias.detach().mean()) < 6.0  # the bias moved down
    on = _sqnr(model, qmodel, evaluation)
    off = _quantized_sqnr(model, calib, evaluation)
    assert on > off + 10.0, (on, off)


class Branches(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3, padding=1)
        self.b = nn.Conv2d(3, 4, 3, padding=1)
        with torch.no_grad():
            self.b.weight.mul_(8)  # very different ranges on the two branches
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.head(torch.cat([self.a(x), self.b(x)], dim=1))


def test_concat_inputs_share_the_concat_grid():
    torch.manual_seed(0)
    model = Branches().eval()
    calib = [torch.randn(8, 3, 16, 16) for _ in range(2)]
    plain = mct_fx.quantize(model, calib, "imx500", verbose=False)
    assert float(plain.a_act_quant.scale) != float(plain.b_act_quant.scale)
    qmodel = mct_fx.quantize(model, calib, "imx500", mct_fx.QuantConfig(concat_threshold_update=True),
                             verbose=False)
    out_q = qmodel.cat_act_quant
    for q in (qmodel.a_act_quant, qmodel.b_act_quant):
        assert torch.equal(q.scale, out_q.scale) and torch.equal(q.zero_point, out_q.zero_point)
        assert (q.qmin, q.qmax) == (out_q.qmin, out_q.qmax)
    x = calib[0]
    both = torch.cat([qmodel.a_act_quant(model.a(x)), qmodel.b_act_quant(model.b(x))], 1)
    assert torch.equal(out_q(both), both)  # the concat's own quantizer is now an identity


@pytest.mark.parametrize("field,value", [("z_threshold", 0.0), ("shift_negative_ratio", 1.5),
                                         ("weights_second_moment_correction", "yes")])
def test_bad_config_values_are_rejected(field, value):
    with pytest.raises(ValueError, match=field):
        mct_fx.QuantConfig(**{field: value})


def test_relu_bound_on_mobilenet_v2_keeps_outputs():
    model = torchvision.models.mobilenet_v2(weights=None)
    zoo.reestimate_bn(model, 64)
    x = zoo.images(2, 64, seed=1)
    gm = _annotated(model, x)
    assert bound_relus_to_power_of_two(gm) == 34  # 17 blocks x 2 (the first has one) + the stem; not the head
    with torch.no_grad():
        assert torch.allclose(gm(x), model(x), atol=1e-4, rtol=1e-4)


def test_bias_correction_helps_at_4_bit_weights():
    """The trained demo CNN at W4A8: cancelling the mean shift of the 4-bit kernels recovers SQNR."""
    model, calib, test = _demo()
    w4 = with_bits(get_tpc("imx500"), weights=4)
    on = _quantized_sqnr(model, calib, test, w4, weights_second_moment_correction=False)
    off = _quantized_sqnr(model, calib, test, w4, weights_bias_correction=False, weights_second_moment_correction=False)
    assert on > off + 0.4, (on, off)


class Unbalanced(nn.Module):
    """conv -> ReLU -> depthwise conv -> ReLU -> conv and linear -> ReLU -> linear, where each layer's output
    channels are scaled apart (30x) and the next layer scales them back: the float function of a balanced
    network whose activations are not."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 16, 3, padding=1)
        self.c2 = nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.c3 = nn.Conv2d(16, 16, 1)
        self.fc1 = nn.Linear(16, 32)
        self.fc2 = nn.Linear(32, 10)
        with torch.no_grad():
            for first, second in ((self.c1, self.c2), (self.c2, self.c3), (self.fc1, self.fc2)):
                n = first.weight.shape[0]
                spread = torch.logspace(-1.5, 0, n)[torch.randperm(n)]  # 30x: within the 32x cap
                first.weight.mul_(spread.reshape((-1,) + (1,) * (first.weight.dim() - 1)))
                first.bias.mul_(spread)
                cols = spread.reshape(-1, 1, 1, 1) if second is self.c2 else spread.reshape(
                    (1, -1) + (1,) * (second.weight.dim() - 2))
                second.weight.div_(cols)

    def forward(self, x):
        y = self.c2(torch.relu(self.c1(x)))  # into a depthwise conv: full equalization
        y = F.leaky_relu(self.c3(torch.relu(y)), 0.1)  # into a dense 1x1 conv: balanced
        return self.fc2(torch.relu(self.fc1(y.mean((2, 3)))))


def test_channel_equalization_keeps_float_function_and_balances_ranges():
    from mct_fx.passes.equalize_channels import equalize_channels

    torch.manual_seed(0)
    model = Unbalanced().eval()
    x = torch.randn(8, 3, 16, 16)
    gm = trace(model, ((x,), {}))
    functionalize_layers(gm)
    fold_batchnorm(gm)
    with torch.no_grad():
        a_before = torch.relu(F.conv2d(x, gm.c1.weight, gm.c1.bias, padding=1)).amax((0, 2, 3))
    assert equalize_channels(gm, ((x,), {})) == 3  # c1 -> c2, c2 -> c3, fc1 -> fc2 (c3 -> mean is not a layer)
    with torch.no_grad():
        assert torch.allclose(gm(x), model(x), atol=1e-5, rtol=1e-4)
        a_after = torch.relu(F.conv2d(x, gm.c1.weight, gm.c1.bias, padding=1)).amax((0, 2, 3))
    assert a_before.max() / a_before.min() > 10
    assert a_after.max() / a_after.min() < 2  # depthwise consumer: every channel near the widest range
    assert torch.isclose(a_after.max(), a_before.max())


def test_channel_equalization_improves_w8a8():
    on, off = _with_and_without(Unbalanced, activation_channel_equalization=True)
    assert on > off + 3.0, (on, off)


def _demo():
    from mct_fx import demo

    model = demo.load_model()
    calib, test, _ = demo.load_samples()
    return model, list(calib[:128].split(32)), list(test[:256].split(64))


def test_second_moment_correction_matches_output_statistics():
    """On the calibration batches it measured, conv3 with 4-bit weights has the float per-channel mean and std."""
    model, calib, _ = _demo()
    # alignment off: the check feeds conv3's quantized kernel the float model's (unscaled) input
    qmodel = mct_fx.quantize(model, calib, with_bits(get_tpc("imx500"), weights=4),
                             mct_fx.QuantConfig(weights_second_moment_correction=True, power_of_two_alignment=False),
                             verbose=False)
    with torch.no_grad():
        h = model.relu2(model.bn2(model.conv2(model.relu1(model.bn1(model.conv1(torch.cat(calib)))))))
        yf = model.bn3(model.conv3(h))
        yq = F.conv2d(h, qmodel.conv3_weight_quant(qmodel.conv3.weight), qmodel.conv3.bias, 1, 1)
        plain = mct_fx.quantize(model, calib, with_bits(get_tpc("imx500"), weights=4),
                                mct_fx.QuantConfig(weights_second_moment_correction=False,
                                                   power_of_two_alignment=False), verbose=False)
        yp = F.conv2d(h, plain.conv3_weight_quant(plain.conv3.weight), plain.conv3.bias, 1, 1)
    std_f, std_q, std_p = (y.std((0, 2, 3)) for y in (yf, yq, yp))
    assert torch.allclose(yq.mean((0, 2, 3)), yf.mean((0, 2, 3)), atol=1e-4)
    assert torch.allclose(std_q, std_f, rtol=1e-3)
    assert not torch.allclose(std_p, std_f, rtol=1e-2)  # without it the spread is off


def test_second_moment_correction_beats_bias_correction_at_4_bits():
    model, calib, test = _demo()
    w4 = with_bits(get_tpc("imx500"), weights=4)
    smc = _quantized_sqnr(model, calib, test, w4, weights_second_moment_correction=True)
    bc = _quantized_sqnr(model, calib, test, w4, weights_second_moment_correction=False)
    assert smc > bc + 1.0, (smc, bc)


def _calibration_error(model, qmodel, batches):
    x = torch.cat(batches)[:32]  # auto compares on the first 32 retained images
    with torch.no_grad():
        return float((qmodel(x) - model(x)).double().square().sum())


@pytest.mark.parametrize("case", ["demo", "random regnet_x_400mf"])
def test_auto_keeps_the_correction_nearer_the_float_outputs(case):
    """``auto`` below 8 bits: the model is the bias- or the second-moment-corrected one, whichever is nearer
    the float outputs on the first 32 calibration images."""
    if case == "demo":
        model, calib, _ = _demo()
        expected = "second-moment"  # the trained demo CNN at W4: variance matching wins (test above)
    else:
        torch.manual_seed(0)
        model = torchvision.models.regnet_x_400mf(weights=None)
        zoo.reestimate_bn(model, 32)
        model.eval()
        calib = [zoo.images(8, 32, seed=s) for s in range(4)]
        expected = "bias"  # a random-weight network: matching the variance does not pay here
    w4 = with_bits(get_tpc("imx500"), weights=4)
    models = {mode: mct_fx.quantize(model, calib, w4, mct_fx.QuantConfig(weights_second_moment_correction=mode),
                                    verbose=False) for mode in (True, False, "auto")}
    errors = {"second-moment": _calibration_error(model, models[True], calib),
              "bias": _calibration_error(model, models[False], calib)}
    kept = models["auto"].meta["mct_fx.weight_correction"]
    assert kept == min(errors, key=errors.get) == expected, errors
    twin = models[True] if kept == "second-moment" else models[False]
    with torch.no_grad():
        for b in calib:
            assert torch.equal(models["auto"](b), twin(b))
    fresh = mct_fx.prepare(model, calib[0], w4)
    fresh.load_state_dict(models["auto"].state_dict())
    with torch.no_grad():
        assert torch.equal(fresh(calib[0]), models["auto"](calib[0]))


def test_auto_leaves_8_bit_models_alone():
    model, calib, test = _demo()
    auto = mct_fx.quantize(model, calib, "imx500", verbose=False)
    plain = mct_fx.quantize(model, calib, "imx500", mct_fx.QuantConfig(weights_second_moment_correction=False),
                            verbose=False)
    assert auto.meta["mct_fx.weight_correction"] == "bias"
    with torch.no_grad():
        for b in test:
            assert torch.equal(auto(b), plain(b))


ALL_ON = dict(relu_bound_to_power_of_2=True, activation_channel_equalization=True, z_threshold=12.0,
              softmax_shift=True, concat_threshold_update=True, weights_second_moment_correction=True,
              shift_negative_params_search=True)


def test_everything_on_quantizes_and_round_trips():
    model = torchvision.models.mobilenet_v2(weights=None)
    zoo.reestimate_bn(model, 32)
    model.eval()
    calib = [zoo.images(4, 32, seed=s) for s in range(3)]
    config = mct_fx.QuantConfig(**ALL_ON)
    qmodel = mct_fx.quantize(model, calib, "imx500", config, verbose=False)
    fresh = mct_fx.prepare(model, calib[0], "imx500", config)
    fresh.load_state_dict(qmodel.state_dict())
    with torch.no_grad():
        assert torch.equal(fresh(calib[1]), qmodel(calib[1]))
    assert _sqnr(model, qmodel, calib) > 2.5  # random weights, 32x32, 12 images: 2.9-3.8 dB over seeds 0-2
