"""Data-free calibration: images from BatchNorm statistics (mct_fx.generate_data)."""

from __future__ import annotations

import copy

import pytest
import torch
import torchvision
from torch import nn

import mct_fx
from mct_fx.datagen import (
    DataGenConfig,
    DataInit,
    ImageGranularity,
    LayerWeighting,
    OutputLoss,
    Scheduler,
    bn_alignment,
    generate_data,
)
from mct_fx.demo import load_model, load_samples
from mct_fx.passes.tap_bn_inputs import BNTapError, batchnorm_with_moments

SHAPE = (1, 28, 28)
FAST = dict(normalization="none", extra_pixels=4, batch_size=16)  # the demo model reads [0, 1] grey 28x28 images


def _accuracy(model, images, labels) -> float:
    with torch.no_grad():
        return float((model(images).argmax(1) == labels).float().mean()) * 100


@pytest.fixture(scope="module")
def demo():
    return load_model()


@pytest.fixture(scope="module")
def generated(demo):
    """64 images after 60 iterations, with the per-iteration losses."""
    history = []
    images = generate_data(demo, 64, SHAPE, DataGenConfig(n_iter=60, **FAST), verbose=False,
                           on_iteration=lambda i, bn, out: history.append((bn, out)))
    return images, history


def test_bn_loss_decreases_and_ends_far_below_its_start(generated):
    images, history = generated
    bn = [h[0] for h in history]
    assert len(bn) == 60
    assert bn[-1] < bn[0] / 10, (bn[0], bn[-1])
    # monotone-ish: the mean over each successive fifth of the run goes down
    fifths = [sum(bn[i:i + 12]) / 12 for i in range(0, 60, 12)]
    assert all(b < a for a, b in zip(fifths, fifths[1:], strict=False)), fifths


def test_generated_images_match_the_running_statistics(demo, generated):
    images, _ = generated
    assert images.shape == (64, *SHAPE) and images.dtype == torch.float32 and not images.requires_grad
    assert float(images.min()) >= 0 and float(images.max()) <= 1  # clipped to the valid pixel range
    noise = torch.rand(64, *SHAPE, generator=torch.Generator().manual_seed(1))
    synthetic, start = bn_alignment(demo, images), bn_alignment(demo, noise)
    assert list(synthetic) == ["bn1", "bn2", "bn3", "bn4", "bn5"]
    assert sum(synthetic.values()) < sum(start.values()) / 20, (synthetic, start)
    # per layer: the images' input mean and std close to the running ones, relative to the running std
    model, stats = copy.deepcopy(demo), {}
    for name in synthetic:
        getattr(model, name).register_forward_hook(
            lambda m, inp, out, name=name: stats.__setitem__(name, (inp[0].mean((0, 2, 3)), inp[0].std((0, 2, 3)))))
    with torch.no_grad():
        model(images)
    for name, (mean, std) in stats.items():
        bn = getattr(demo, name)
        run_std = bn.running_var.sqrt()
        assert float(((mean - bn.running_mean).abs() / run_std).median()) < 0.25, name
        assert float(((std - run_std).abs() / run_std).median()) < 0.25, name


def test_data_free_ptq_on_the_demo_model_keeps_accuracy(demo, generated):
    """quantize() takes the generated tensor as its calibration set (a tensor is a set of samples)."""
    images, _ = generated
    calib, test, labels = load_samples()
    data_free = mct_fx.quantize(demo, images, "imx500", verbose=False)
    real = mct_fx.quantize(demo, calib, "imx500", verbose=False)
    float_acc, free_acc, real_acc = (_accuracy(m, test, labels) for m in (demo, data_free, real))
    assert free_acc >= real_acc - 1.5 and free_acc >= float_acc - 2, (float_acc, real_acc, free_acc)


def test_the_model_is_left_untouched_and_runs_are_repeatable(demo):
    before = copy.deepcopy(demo.state_dict())
    flags = [p.requires_grad for p in demo.parameters()]
    config = DataGenConfig(n_iter=3, seed=7, **FAST)
    a = generate_data(demo, 20, SHAPE, config, verbose=False)
    b = generate_data(demo, 20, SHAPE, config, verbose=False)
    c = generate_data(demo, 20, SHAPE, DataGenConfig(n_iter=3, seed=8, **FAST), verbose=False)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.shape == (20, *SHAPE)  # a last batch of 4
    assert all(torch.equal(v, demo.state_dict()[k]) for k, v in before.items())
    assert [p.requires_grad for p in demo.parameters()] == flags and not demo.training


@pytest.mark.parametrize("change", [
    dict(granularity=ImageGranularity.BATCH), dict(granularity=ImageGranularity.IMAGE),
    dict(layer_weighting=LayerWeighting.FIRST_LAYER), dict(layer_weighting=LayerWeighting.GRADIENT),
    dict(output_loss=OutputLoss.INVERSE_MIN_MAX), dict(output_loss=OutputLoss.NONE),
    dict(scheduler=Scheduler.STEP), dict(scheduler=Scheduler.REDUCE_ON_PLATEAU), dict(init=DataInit.DIVERSE),
    dict(optimizer=torch.optim.Adam, lr=0.1), dict(smoothing_sigma=None, flip=False, extra_pixels=0),
    dict(autocast=True),
], ids=lambda c: ",".join(f"{k}={getattr(v, 'value', getattr(v, '__name__', v))}" for k, v in c.items()))
def test_every_option_lowers_the_bn_loss(demo, change):
    history = []
    config = DataGenConfig(n_iter=15, **{**FAST, **change})
    images = generate_data(demo, 32, SHAPE, config, verbose=False, on_iteration=lambda i, bn, out: history.append(bn))
    assert images.shape == (32, *SHAPE) and bool(torch.isfinite(images).all())
    assert min(history[-3:]) < 0.75 * history[0], history


def test_gradient_weighting_balances_the_layers_pull(demo):
    """Each layer's weight is the inverse of its loss's gradient norm on the images: the weights differ
    between layers and sum to one."""
    from mct_fx.datagen import _layer_weights, _Pixels, _prepare, _Targets

    gm, taps = _prepare(demo, (), None)
    config = DataGenConfig(**FAST)
    pixels = _Pixels(SHAPE, config, torch.device("cpu"))
    generator = torch.Generator().manual_seed(0)
    images = pixels.initial(8, generator)
    weights = _layer_weights(LayerWeighting.GRADIENT, gm, images, pixels, _Targets(taps, torch.device("cpu")),
                             generator)
    assert weights.shape == (5,) and abs(float(weights.sum()) - 1) < 1e-5
    assert float(weights.max() / weights.min()) > 1.5


def test_normalization_sets_the_valid_range():
    """torchvision normalization: images stay inside ((0 - mean) / std, (1 - mean) / std) per channel."""
    model = torchvision.models.resnet18(num_classes=10)
    for m in model.modules():  # "trained" statistics: not the initial mean 0 / var 1
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2)
    images = generate_data(model.eval(), 4, (3, 32, 32), DataGenConfig(n_iter=2, extra_pixels=4), verbose=False)
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    per_channel = images.transpose(0, 1).flatten(1)
    assert bool((per_channel.min(1).values >= -mean / std - 1e-6).all())
    assert bool((per_channel.max(1).values <= (1 - mean) / std + 1e-6).all())
    symmetric = generate_data(model, 4, (3, 32, 32), DataGenConfig(n_iter=2, extra_pixels=4,
                                                                     normalization="symmetric"), verbose=False)
    assert float(symmetric.min()) >= -1 and float(symmetric.max()) <= 1


@pytest.mark.parametrize("shape", [(3, 4, 5, 6), (3, 4, 7), (3, 4)])
def test_batchnorm_with_moments_is_batchnorm_plus_input_statistics(shape):
    bn = nn.BatchNorm1d(4) if len(shape) < 4 else nn.BatchNorm2d(4)
    bn.running_mean.uniform_(-1, 1)
    bn.running_var.uniform_(0.5, 2)
    bn.weight.data.uniform_(0.5, 1.5)
    bn.bias.data.uniform_(-1, 1)
    bn.eval()
    scale = bn.weight.detach() / (bn.running_var + bn.eps).sqrt()
    shift = bn.bias.detach() - bn.running_mean * scale
    x = torch.randn(*shape)
    y, mean, second = batchnorm_with_moments(x, scale, shift)
    dims = tuple(range(2, len(shape)))
    assert torch.allclose(y, bn(x), atol=1e-5)
    assert torch.allclose(mean, x.mean(dims) if dims else x, atol=1e-6)
    assert torch.allclose(second, (x * x).mean(dims) if dims else x * x, atol=1e-5)
    xd = torch.randn(*shape, dtype=torch.double, requires_grad=True)
    assert torch.autograd.gradcheck(lambda v: batchnorm_with_moments(v, scale.double(), shift.double()), (xd,))


# ------------------------------------------------------------------ bad input


def _conv_bn() -> nn.Module:
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.LazyLinear(2))
    model(torch.zeros(1, 1, 8, 8))
    model[1].running_var.fill_(2.0)
    return model.eval()


def test_models_without_usable_batchnorm_are_rejected(demo):
    GREY = DataGenConfig(normalization="none")  # noqa: N806
    with pytest.raises(BNTapError, match="no BatchNorm layer.*fuse_conv_bn_eval"):
        generate_data(nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU()), 4, (1, 8, 8), GREY, verbose=False)
    fused = torch.nn.utils.fusion.fuse_conv_bn_eval(demo.conv1, demo.bn1)
    with pytest.raises(BNTapError, match="no BatchNorm layer"):
        generate_data(nn.Sequential(fused, nn.ReLU()), 4, SHAPE, GREY, verbose=False)
    with pytest.raises(BNTapError, match="already folded"):
        generate_data(mct_fx.quantize(demo, load_samples()[0][:32], verbose=False), 4, SHAPE, GREY, verbose=False)
    with pytest.raises(BNTapError, match="node '_0' \\(Sequential\\) fuses its BatchNorm '1'.*leaf_modules"):
        generate_data(nn.Sequential(_conv_bn()), 4, (1, 8, 8), GREY, verbose=False, leaf_modules=["0"])
    from torch.ao.nn.intrinsic.qat import ConvBn2d

    qat = ConvBn2d(1, 4, 3, qconfig=torch.ao.quantization.get_default_qat_qconfig())  # torch.ao's QAT fusion
    qat.bn.running_var.fill_(2.0)
    with pytest.raises(BNTapError, match="node '_0' \\(ConvBn2d\\) fuses its BatchNorm 'bn'"):
        generate_data(nn.Sequential(qat).eval(), 4, (1, 8, 8), GREY, verbose=False)
    untrained = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4))
    with pytest.raises(BNTapError, match="node '_1'.*looks untrained"):
        generate_data(untrained.eval(), 4, (1, 8, 8), GREY, verbose=False)
    stateless = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4, track_running_stats=False))
    with pytest.raises(BNTapError, match="node '_1'.*track_running_stats=False"):
        generate_data(stateless.eval(), 4, (1, 8, 8), GREY, verbose=False)


@pytest.mark.parametrize("kwargs, match", [
    (dict(n_iter=0), "DataGenConfig.n_iter"), (dict(batch_size=1.5), "DataGenConfig.batch_size"),
    (dict(lr=0), "DataGenConfig.lr"), (dict(granularity="pixel"), "DataGenConfig.granularity"),
    (dict(normalization="imagenet"), "DataGenConfig.normalization"),
    (dict(optimizer="adam"), "DataGenConfig.optimizer"), (dict(extra_pixels=-1), "DataGenConfig.extra_pixels"),
    (dict(smoothing_sigma=0), "DataGenConfig.smoothing_sigma"),
])
def test_bad_config_fields_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DataGenConfig(**kwargs)


def test_bad_arguments_fail_before_any_work(demo):
    with pytest.raises(ValueError, match="shape must be"):
        generate_data(demo, 4, (28, 28), verbose=False)
    with pytest.raises(ValueError, match="n_images"):
        generate_data(demo, 0, SHAPE, verbose=False)
    with pytest.raises(ValueError, match="3 mean values for 1 input channel"):
        generate_data(demo, 4, SHAPE, DataGenConfig(normalization="torchvision"), verbose=False)


def test_a_tensor_is_a_set_of_samples_for_every_workflow():
    from mct_fx.data import TENSOR_BATCH, CalibrationError, iter_batches, loader_length

    data = torch.zeros(2 * TENSOR_BATCH + 6, 1, 4, 4)
    sizes = [args[0].shape[0] for args, _ in iter_batches(data)]
    assert sizes == [TENSOR_BATCH, TENSOR_BATCH, 6] and loader_length(data) == 3
    with pytest.raises(CalibrationError, match="0-d tensor"):
        list(iter_batches(torch.tensor(1.0)))
    with pytest.raises(CalibrationError, match="batch 1.*NaN"):
        list(iter_batches(torch.cat([data, torch.full((1, 1, 4, 4), float("nan"))])[TENSOR_BATCH - 1:]))


@pytest.mark.slow
def test_data_free_w8a8_on_the_fashion_mnist_resnet_matches_real_data_ptq():
    """256 images from the BatchNorm statistics, 200 iterations: W8A8 within 1 point of PTQ on 512 real images."""
    import train_fmnist

    import assets

    if not assets.fashion_mnist_available():
        pytest.skip("Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")
    model, _ = train_fmnist.load("fmnist_resnet")
    x, _ = assets.fashion_mnist("train")
    xt, yt = assets.fashion_mnist("test")
    real = x[torch.randperm(len(x), generator=torch.Generator().manual_seed(0))[:512]]
    images = generate_data(model, 256, SHAPE, DataGenConfig(n_iter=200, normalization="none", extra_pixels=4),
                           verbose=False)
    real_acc = train_fmnist.accuracy(mct_fx.quantize(model, real, verbose=False), xt, yt)
    free_acc = train_fmnist.accuracy(mct_fx.quantize(model, images, verbose=False), xt, yt)
    assert free_acc >= real_acc - 1, (real_acc, free_acc)
    assert sum(bn_alignment(model, images).values()) < 10 * sum(bn_alignment(model, real).values())
