"""GPTQ / EPTQ: learned rounding primitives, the training loop, and the result being a normal quantized model."""

import pytest
import torch
from torch import nn

import mct_fx
from mct_fx.gptq import GPTQConfig, Trainables, _beta
from mct_fx.graph_utils import attr_value, with_outputs
from mct_fx.passes.align_pot import ALIGNMENT_KEY
from mct_fx.passes.layer_inputs import quantized_layers
from mct_fx.quantizers import WeightQuantizer
from mct_fx.quantizers.trainable import GAMMA, ZETA, SoftRounding, STERounding
from mct_fx.tpc.derive import with_bits

import zoo


def _grid(bits=4, method="symmetric"):
    w = torch.randn(16, 8, 3, 3)
    q = WeightQuantizer(method, bits, channels=16, axis=0)
    q.freeze(w)
    return w, q


def test_soft_rounding_hard_path_is_floor_plus_the_sign_of_alpha():
    w, q = _grid()
    soft = SoftRounding(q, w)
    # at initialisation the hard path is rounding to nearest (what PTQ does)
    hard, _ = soft.hardened()
    assert torch.equal(hard, q(w))
    with torch.no_grad():
        soft.alpha.copy_(torch.randn_like(soft.alpha))
    hard, scale = soft.hardened()
    s = scale.reshape(-1, 1, 1, 1)
    expected = torch.clamp(torch.floor(w / s) + (soft.alpha >= 0).float(), q.qmin, q.qmax) * s
    assert torch.equal(hard, expected)
    assert torch.equal(q(hard), hard)  # on the grid: a frozen quantizer keeps it as is
    # the soft path starts at the float weight (inside the clipping range)
    inside = (w / s).abs() < q.qmax
    fresh = SoftRounding(q, w)
    assert torch.allclose(fresh(w)[inside], w[inside], atol=1e-5)


def test_regularizer_drives_soft_targets_to_zero_or_one():
    w, q = _grid()
    soft = SoftRounding(q, w)
    start = soft.regularization(2.0).item()
    opt = torch.optim.Adam(soft.parameters(), lr=0.1)
    for step in range(300):
        opt.zero_grad()
        soft.regularization(_beta(step, 300, 0.2)).backward()
        opt.step()
    h = soft.soft_targets()
    assert start > 0.2 * h.numel()
    assert ((h == 0) | (h == 1)).float().mean() > 0.99
    assert soft.regularization(2.0).item() < 0.01 * start
    assert GAMMA < 0 and ZETA > 1


def test_ste_rounding_starts_at_the_ptq_rounding_and_moves_one_step_at_most():
    w, q = _grid(method="uniform")
    ste = STERounding(q, w)
    assert torch.equal(ste(w), q(w))
    with torch.no_grad():
        ste.delta.fill_(5.0)
    steps = ((ste(w) - q(w)) / q.scale.reshape(-1, 1, 1, 1)).round()
    assert steps.max() <= 1 and steps.min() >= 0


def test_learned_scale_is_a_parameter_and_comes_back_to_the_quantizer():
    w, q = _grid()
    soft = SoftRounding(q, w, learn_scale=True)
    assert isinstance(soft.scale, nn.Parameter)
    (soft(w) ** 2).sum().backward()
    assert soft.scale.grad is not None and soft.scale.grad.abs().sum() > 0


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
            nn.Conv2d(16, 16, 3, padding=1, groups=16), nn.BatchNorm2d(16), nn.ReLU6(),
            nn.Conv2d(16, 32, 1), nn.BatchNorm2d(32), nn.Hardswish())
        self.fc = nn.Linear(32, 10)

    def forward(self, x):
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(self.features(x), 1), 1))


def _task(n, seed):
    """Ten classes of smooth random patterns plus noise: a model trained on it has informative features."""
    protos = nn.functional.interpolate(torch.randn(10, 3, 4, 4, generator=torch.Generator().manual_seed(0)),
                                       size=16, mode="bilinear")
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 10, (n,), generator=g)
    return protos[y] + 0.8 * torch.randn(n, 3, 16, 16, generator=g), y


def _trained_net():
    torch.manual_seed(0)
    net = Net()
    x, y = _task(2048, 1)
    opt = torch.optim.Adam(net.parameters(), 3e-3)
    for _ in range(150):
        idx = torch.randint(0, len(x), (64,))
        opt.zero_grad()
        nn.functional.cross_entropy(net(x[idx]), y[idx]).backward()
        opt.step()
    return net.eval()


def _data(n=64):
    return list(_task(n, 2)[0].split(16))


W4 = with_bits(mct_fx.get_tpc("imx500"), weights=4)


def _output_mse(model, q, data):
    with torch.no_grad():
        return sum(float((model(x) - q(x)).square().mean()) for x in data) / len(data)


@pytest.mark.parametrize("rounding, epochs", [("soft", 120), ("ste", 15)])
def test_gptq_result_is_an_ordinary_quantized_model_closer_to_float(rounding, epochs, tmp_path):
    model, data = _trained_net(), _data()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ptq = mct_fx.quantize(model, data, W4, verbose=False)
    config = GPTQConfig(epochs=epochs, rounding=rounding)
    q = mct_fx.gptq(model, data, W4, config, verbose=False)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the user's model is untouched
    assert q.state_dict().keys() == ptq.state_dict().keys()
    assert isinstance(q, torch.fx.GraphModule) and q.code == ptq.code
    report = q.meta["mct_fx.gptq"]
    assert report.layers == 4 and report.steps == epochs * len(data)
    for layer, qnode, wq in quantized_layers(q):  # hard rounding written into the weights: on the grid
        w = attr_value(q, qnode.args[0])
        assert isinstance(wq, WeightQuantizer) and torch.equal(wq(w), w), layer.name
    # 480 steps: the rounding settles; at 240 the outcome swung with the start (aligned 0.013 / unaligned
    # 0.009 vs PTQ's 0.011 held-out MSE; 480 steps: 0.003 both).  STE's gain shows on the real models (slow tests)
    if rounding == "soft":
        held_out = [_task(512, 3)[0]]
        assert _output_mse(model, q, held_out) < 0.9 * _output_mse(model, ptq, held_out)
    mct_fx.export_onnx(q, data[0][:1], tmp_path / "q.onnx")


def test_gptq_is_deterministic_under_a_seed():
    model, data = _trained_net(), _data(32)
    config = GPTQConfig(epochs=2, hessian=mct_fx.HessianConfig(max_iterations=4, min_iterations=2))
    a = mct_fx.gptq(model, data, W4, config, verbose=False)
    b = mct_fx.gptq(model, data, W4, config, verbose=False)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True)
               if isinstance(x, torch.Tensor))


def test_the_teacher_follows_the_power_of_two_alignment():
    """PTQ rescales the student's aligned chains; a teacher left at the float scale would pull those layers
    toward the wrong outputs (the first epoch's distance would be the rescaling, not the quantization)."""
    model, data = _trained_net(), _data(32)
    config = GPTQConfig(epochs=1, hessian=mct_fx.HessianConfig(max_iterations=4, min_iterations=2))
    losses = {}
    for align in (True, False):
        q = mct_fx.gptq(model, data, W4, config, quant_config=mct_fx.QuantConfig(power_of_two_alignment=align),
                        verbose=False)
        assert bool(q.meta.get(ALIGNMENT_KEY)) == align
        losses[align] = q.meta["mct_fx.gptq"].epoch_losses[0]
    assert losses[True] < 1.2 * losses[False], losses  # left at the float scale: 1.45x here


def test_hessian_weighting_and_teacher_recomputation():
    model, data = _trained_net(), _data(32)
    for loss in ("sample_layer", "layer"):
        config = GPTQConfig(epochs=3, loss=loss, teacher_cache_bytes=0, hessian_batch_size=8,
                            gradual_activation=False, hessian=mct_fx.HessianConfig(max_iterations=6, min_iterations=3))
        q = mct_fx.gptq(model, data, W4, config, verbose=False)
        report = q.meta["mct_fx.gptq"]
        assert not report.teacher_cached and report.hessian_seconds > 0
        assert report.epoch_losses[-1] < report.epoch_losses[0], (loss, report.epoch_losses)


def test_student_forward_compiles_without_graph_breaks():
    model, data = _trained_net(), _data(16)
    q = mct_fx.quantize(model, data, W4, verbose=False)
    trainables = Trainables(q, GPTQConfig(learn_scale=True))
    trainables.set_fraction(0.5)
    probe = with_outputs(q, trainables.layers)
    compiled = torch.compile(probe, fullgraph=True, backend="aot_eager")
    eager_out = probe(data[0])
    out = compiled(data[0])
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(eager_out, out, strict=True))
    sum(o.square().mean() for o in out).backward()
    assert all(p.grad is not None for p in trainables.rounding_parameters())
    trainables.restore()


def test_bad_config_fails_early():
    with pytest.raises(ValueError, match="epochs"):
        GPTQConfig(epochs=0)
    with pytest.raises(ValueError, match="'median'"):
        GPTQConfig(loss="median")
    with pytest.raises(ValueError, match="warmup"):
        GPTQConfig(warmup=1.0)


OPTQ = mct_fx.QuantConfig(optq=mct_fx.OPTQConfig())


@pytest.mark.slow
def test_gptq_and_optq_beat_ptq_w4a8_on_the_fashion_mnist_resnet():
    """The ResNet: the retrained MobileNet-style model is within 0.5 points of float at W4A8 PTQ already."""
    import train_fmnist

    import assets

    if not assets.fashion_mnist_available():
        pytest.skip("Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")
    model, _ = train_fmnist.load("fmnist_resnet")
    x, _ = assets.fashion_mnist("train")
    xt, yt = assets.fashion_mnist("test")
    calib = list(x[torch.randperm(len(x), generator=torch.Generator().manual_seed(0))[:512]].split(32))

    def accuracy(q):
        with torch.no_grad():
            return float((torch.cat([q(b) for b in xt.split(1000)]).argmax(1) == yt).float().mean()) * 100

    ptq = accuracy(mct_fx.quantize(model, calib, W4, verbose=False))
    gptq = accuracy(mct_fx.gptq(model, calib, W4, GPTQConfig(epochs=5), verbose=False))
    optq = accuracy(mct_fx.quantize(model, calib, W4, OPTQ, verbose=False))
    assert gptq > ptq + 0.5 and optq > ptq + 0.5, (ptq, gptq, optq)


@pytest.mark.slow
def test_gptq_and_optq_beat_ptq_w4a8_on_imagenet_mobilenet_v2():
    import torchvision

    import assets

    try:
        assets.mobilenet_v2_weights()
        calib, crops = assets.imagenet_fidelity_sets(64, 128)
    except assets.MissingAsset as e:
        pytest.skip(str(e))
    model = torchvision.models.mobilenet_v2(weights="IMAGENET1K_V1").eval()
    with torch.no_grad():
        ref = model(crops)

    def quality(q):
        with torch.no_grad():
            out = q(crops)
        return float((out.argmax(1) == ref.argmax(1)).float().mean()) * 100, float(zoo.sqnr_db(ref, out))

    batches = list(calib.split(16))
    ptq = quality(mct_fx.quantize(model, batches, W4, verbose=False))
    gptq = quality(mct_fx.gptq(model, batches, W4, GPTQConfig(epochs=4), verbose=False))
    optq = quality(mct_fx.quantize(model, batches, W4, OPTQ, verbose=False))
    assert gptq[1] > ptq[1] and gptq[0] > ptq[0] + 1.0, (ptq, gptq)  # measured 5.68 -> 5.99 dB, 53.1 -> 57.8 %
    assert optq[1] > ptq[1] and optq[0] > ptq[0] + 1.0, (ptq, optq)
