"""mct_fx.quantize end to end: oracle, state, data handling, bad input, targets."""

import io
import math

import pytest
import torch
import torchvision
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import mct_fx
from mct_fx import CalibrationError, TPCError
from mct_fx.quantizers import ActivationQuantizer
from mct_fx.quantizers.search import activation_grid
from mct_fx.tpc import get_tpc, with_bits

import zoo


@pytest.fixture(scope="module")
def resnet18():
    model, side = zoo.build("resnet18")
    return model, zoo.calibration(side, n_batches=4), zoo.evaluation(side)


def _sqnr(model, qmodel, x):
    with torch.no_grad():
        return zoo.sqnr_db(model(x), qmodel(x))


def test_noquant_equals_float(resnet18):
    model, calib, x = resnet18
    q = mct_fx.quantize(model, calib, "noquant", verbose=False)
    assert not any(isinstance(m, mct_fx.ActivationQuantizer | mct_fx.WeightQuantizer) for m in q.modules())
    with torch.no_grad():
        assert torch.allclose(q(x), model(x), atol=1e-4, rtol=1e-4)  # BN-folding rounding only


def test_w4_measurably_worse_than_w8(resnet18):
    model, calib, x = resnet18
    w8 = _sqnr(model, mct_fx.quantize(model, calib, "imx500", verbose=False), x)
    w4 = _sqnr(model, mct_fx.quantize(model, calib, with_bits(get_tpc("imx500"), weights=4), verbose=False), x)
    assert w4 < w8 - 3.0


def test_sixteen_bit_activations_beat_eight(resnet18):
    model, calib, x = resnet18
    a8 = _sqnr(model, mct_fx.quantize(model, calib, "imx500_16bit", verbose=False), x)
    a16_tpc = with_bits(get_tpc("imx500_16bit"), activations=16)
    a16 = _sqnr(model, mct_fx.quantize(model, calib, a16_tpc, verbose=False), x)
    assert a16 > a8 + 3.0


def test_int8_target_uses_asymmetric_activations(resnet18):
    model, calib, x = resnet18
    q = mct_fx.quantize(model, calib, "int8", verbose=False)
    acts = [m for m in q.modules() if isinstance(m, ActivationQuantizer)]
    assert all(a.method.value == "uniform" and (a.qmin, a.qmax) == (0, 255) for a in acts)
    assert any(float(a.zero_point) > 0 for a in acts)  # signed inputs get a real zero point
    assert _sqnr(model, q, x) > 15


def test_model_not_mutated(resnet18):
    model, calib, _ = resnet18
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    mct_fx.quantize(model, calib, "imx500", verbose=False)
    assert model.training
    model.eval()
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert not any(isinstance(m, ActivationQuantizer) for m in model.modules())


def test_state_dict_round_trip_is_bit_identical(resnet18):
    model, calib, x = resnet18
    q = mct_fx.quantize(model, calib, "imx500", verbose=False)
    buffer = io.BytesIO()
    torch.save(q.state_dict(), buffer)
    buffer.seek(0)
    fresh = mct_fx.prepare(model, calib[0], "imx500")
    with torch.no_grad():
        assert not torch.equal(fresh(x), q(x))  # prepared = observing, float
        fresh.load_state_dict(torch.load(buffer, weights_only=False))
        assert torch.equal(fresh(x), q(x))


def test_summary_table(resnet18):
    model, calib, _ = resnet18
    q = mct_fx.quantize(model, calib, "imx500", verbose=False)
    summary = mct_fx.summary(q)
    rows = {r.node: r for r in summary.layers}
    assert rows["conv1"].weights == "8b symmetric signed per-channel"
    assert rows["conv1"].activation == "fused into relu"
    assert rows["relu"].activation == "8b power_of_two unsigned" and rows["relu"].grid.startswith("0..")
    assert rows["fc"].op == "FullyConnected"
    text = str(summary)
    assert "layer4_1_conv2" in text and "grid" in text.splitlines()[0]


def test_progress_bar(resnet18, capsys):
    model, calib, _ = resnet18
    mct_fx.quantize(model, calib[:2], "imx500", verbose=True)
    assert "calibration" in capsys.readouterr().err
    mct_fx.quantize(model, calib[:2], "imx500", verbose=False)
    assert "calibration" not in capsys.readouterr().err


class TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(8, 4)
        self.b = nn.Linear(6, 4)

    def forward(self, image, extra):
        return torch.relu(self.a(image)) + self.b(extra)


def test_loader_formats():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3)).eval()
    x = torch.randn(16, 3, 8, 8)
    labels = torch.zeros(16, dtype=torch.long)
    for loader in (DataLoader(TensorDataset(x, labels), batch_size=4),  # (input, label) tuples
                   [x[:8], x[8:]],  # tensors
                   ([x[:8], labels[:8]],)):  # lists
        q = mct_fx.quantize(model, loader, "imx500", verbose=False)
        assert _sqnr(model, q, x) > 20
    two = TwoInputs().eval()
    batches = [{"image": torch.randn(4, 8), "extra": torch.randn(4, 6)} for _ in range(3)]
    q = mct_fx.quantize(two, batches, "imx500", verbose=False)
    with torch.no_grad():
        ref, out = two(**batches[0]), q(**batches[0])
    assert zoo.sqnr_db(ref, out) > 20
    q = mct_fx.quantize(model, iter([x[:4], x[4:8], x[8:]]), "imx500", n_batches=2, verbose=False)  # one-shot iterator
    assert _sqnr(model, q, x) > 20


class Small(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.fc = nn.Linear(4 * 6 * 6, 2)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).flatten(1))


@pytest.mark.parametrize("loader, message", [
    ([], "yielded no batches"),
    ([torch.randn(2, 3, 8, 8), torch.randn(2, 3, 8, 8), torch.full((2, 3, 8, 8), math.nan)],
     "calibration batch 2: input 0 contains NaN or Inf"),
    ([torch.randn(2, 3, 8, 8), torch.randn(2, 3, 8, 8) * math.inf], "calibration batch 1: input 0 contains NaN"),
    ([torch.randn(2, 3, 8, 8), torch.randn(2, 3, 10, 10)],
     r"calibration batch 1 \(input shapes \(2, 3, 10, 10\)\) fails at node 'fc'"),
    ([torch.randn(0, 3, 8, 8)], "calibration batch 0: input 0 is empty"),
    ([torch.randn(2, 3, 8, 8), "not a tensor"], "calibration batch 1 is a str"),
    (42, "must be iterable"),
])
def test_bad_calibration_data_fails_clearly(loader, message):
    model = Small().eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CalibrationError, match=message):
        mct_fx.quantize(model, loader, "imx500", verbose=False)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_bad_target_fails_before_touching_data(tmp_path):
    def never():
        raise AssertionError("the loader must not be read")
        yield

    with pytest.raises(TPCError, match="unknown TPC 'imx501'"):
        mct_fx.quantize(Small(), never(), "imx501", verbose=False)
    bad = tmp_path / "bad.json"
    bad.write_text('{"name": "x", "default_options": {"candidates": [{"activation_n_bits": 99}]}}')
    with pytest.raises(TPCError, match=r"tpc.default_options.candidates\[0\].activation_n_bits"):
        mct_fx.quantize(Small(), never(), str(bad), verbose=False)


def test_unknown_op_stays_float_and_is_reported():
    class WithErf(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)

        def forward(self, x):
            return torch.special.erf(self.conv(x))

    model = WithErf().eval()
    q = mct_fx.quantize(model, [torch.randn(2, 3, 8, 8)], "imx500", verbose=False)
    assert mct_fx.summary(q).unknown == ("special_erf",)
    assert "left float" in str(mct_fx.summary(q))
    assert not hasattr(q, "special_erf_act_quant")


def test_functional_layers_with_parameter_weights_are_quantized():
    class Functional(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(4, 3, 3, 3))
            self.fc_w = nn.Parameter(torch.randn(2, 4))

        def forward(self, x):
            y = torch.nn.functional.conv2d(x, self.w, padding=1)
            return torch.nn.functional.linear(y.mean((2, 3)), self.fc_w)

    model = Functional().eval()
    q = mct_fx.quantize(model, [torch.randn(4, 3, 8, 8)], "imx500", verbose=False)
    rows = {r.node: r for r in mct_fx.summary(q).layers}
    assert rows["conv2d"].weights.startswith("8b symmetric") and rows["linear"].weights.startswith("8b")


def test_other_torchvision_models_quantize():
    for name in ("mobilenet_v3_small", "squeezenet1_1"):
        model = torchvision.models.get_model(name, weights=None)
        zoo.reestimate_bn(model, 64)
        calib = zoo.calibration(64, n_batches=2)
        q = mct_fx.quantize(model.eval(), calib, "imx500", verbose=False)
        assert q(calib[0]).shape == (8, 1000)


class AllLayerKinds(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv1d(3, 6, 3)
        self.t1 = nn.ConvTranspose1d(6, 4, 2, stride=2)
        self.c3 = nn.Conv3d(1, 4, 3, padding=1)
        self.t3 = nn.ConvTranspose3d(4, 2, 2, stride=2)
        self.fc = nn.Linear(2 + 4, 3)

    def forward(self, seq, vol):
        a = torch.relu(self.t1(torch.relu(self.c1(seq)))).mean(-1)
        b = self.t3(torch.relu(self.c3(vol))).mean((2, 3, 4))
        return self.fc(torch.cat([b, a], 1))


def test_every_layer_kind_gets_a_weight_quantizer():
    model = AllLayerKinds().eval()
    batches = [{"seq": torch.randn(4, 3, 16), "vol": torch.randn(4, 1, 6, 6, 6)} for _ in range(2)]
    q = mct_fx.quantize(model, batches, "imx500", verbose=False)
    weights = {r.node: r.weights for r in mct_fx.summary(q).layers}
    assert all(weights[n].startswith("8b symmetric") for n in ("c1", "t1", "c3", "t3", "fc"))
    assert q.get_submodule("t3_weight_quant").axis == 1
    with torch.no_grad():
        assert zoo.sqnr_db(model(**batches[0]), q(**batches[0])) > 25


def test_inplace_reuses_the_model_modules():
    model = Small().eval()
    q = mct_fx.quantize(model, [torch.randn(2, 3, 8, 8)], "imx500", inplace=True, verbose=False)
    assert q.get_submodule("conv") is model.conv  # the caller allowed mutation: no copy


class ConfidentScores(nn.Module):
    """Softmax over 11 columns, one of them (a detector's background) near 1 almost everywhere."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 11, 1)
        with torch.no_grad():
            self.conv.bias.copy_(torch.tensor([9.0] + [0.0] * 10))

    def forward(self, x):
        return self.conv(x).flatten(2).transpose(1, 2).softmax(-1)


def test_softmax_grid_stops_at_one():
    """Many values at 1 make the search prefer threshold 2 (1 is just off an unsigned grid of threshold 1);
    the cap keeps threshold 1, so the small scores keep their resolution."""
    torch.manual_seed(0)
    model = ConfidentScores().eval()
    data = [torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(i)) for i in range(4)]
    qmodel = mct_fx.quantize(model, data, "imx500", verbose=False)
    (q,) = [m for n, m in qmodel.named_modules() if isinstance(m, ActivationQuantizer) and "softmax" in n]
    assert not q.signed and float(q.scale) == 2 ** -8  # threshold 1
    observed = ActivationQuantizer("power_of_two", 8)
    for x in data:
        observed.observer.update(model(x).detach())
    centres, counts = observed.observer.centres_and_counts()
    scale, _, _ = activation_grid(centres, counts, observed.observer.min, observed.observer.max,
                                  q.method, 8, None, "mse", 2.0)
    assert float(scale) == 2 ** -7  # the search alone: threshold 2
