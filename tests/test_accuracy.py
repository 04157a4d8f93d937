"""A CNN trained in the test on real data keeps its accuracy at W8A8."""

import pytest
import torch
from torch import nn

import mct_fx

import assets


def _data():
    """Fashion-MNIST when installed (a 12k/2k subset), else a separable synthetic task."""
    if assets.fashion_mnist_available():
        x, y = assets.fashion_mnist("train")
        xt, yt = assets.fashion_mnist("test")
        return (x[:12000] - 0.286) / 0.353, y[:12000], (xt[:2000] - 0.286) / 0.353, yt[:2000]
    g = torch.Generator().manual_seed(0)
    protos = torch.randn(10, 1, 28, 28, generator=g)
    y = torch.randint(0, 10, (6000,), generator=g)
    x = protos[y] + 1.5 * torch.randn(6000, 1, 28, 28, generator=g)
    return x[:5000], y[:5000], x[5000:], y[5000:]


def _cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
        nn.Conv2d(32, 32, 3, stride=2, padding=1, groups=4), nn.BatchNorm2d(32), nn.Hardswish(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(0.1), nn.Linear(32, 10))


def _accuracy(model, x, y):
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean()) * 100


@pytest.fixture(scope="module")
def trained():
    torch.manual_seed(0)
    x, y, xt, yt = _data()
    model = _cnn()
    opt = torch.optim.Adam(model.parameters(), 3e-3)
    epochs = 3
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 3e-3, total_steps=epochs * ((len(x) + 127) // 128))
    for _ in range(epochs):
        perm = torch.randperm(len(x))
        for i in range(0, len(x), 128):
            idx = perm[i:i + 128]
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    return model.eval(), x, xt, yt


@pytest.mark.parametrize("tpc", ["imx500", "int8"])
def test_w8a8_keeps_accuracy(trained, tpc):
    model, x, xt, yt = trained
    float_acc = _accuracy(model, xt, yt)
    assert float_acc > 70  # the model learned something real (3 short epochs on 2 CPU cores)
    calib = [x[i:i + 64] for i in range(0, 512, 64)]
    q = mct_fx.quantize(model, calib, tpc, verbose=False)
    assert abs(_accuracy(q, xt, yt) - float_acc) <= 1.0


def test_w2_weights_lose_accuracy(trained):
    # the check above can fail: at 2 bits the same model loses a lot
    model, x, xt, yt = trained
    tpc = mct_fx.tpc.with_bits(mct_fx.get_tpc("imx500"), weights=2)
    q = mct_fx.quantize(model, [x[:256]], tpc, verbose=False)
    assert _accuracy(q, xt, yt) < _accuracy(model, xt, yt) - 2.0
