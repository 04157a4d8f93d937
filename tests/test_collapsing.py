"""Linear and residual collapsing: same float function, fewer layers, better W8A8."""

import operator

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import mct_fx
from mct_fx.passes import fold_batchnorm, functionalize_layers
from mct_fx.passes.collapse_linear import collapse_linear_layers
from mct_fx.passes.collapse_residual import collapse_residuals
from mct_fx.trace import trace

import zoo


class Collapsible(nn.Module):
    """Every collapsible pattern, plus look-alikes that must stay."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.point = nn.Conv2d(8, 8, 1)  # conv+bn -> 1x1: collapses
        self.res = nn.Conv2d(8, 8, 3, padding=1)  # res(x) + x: collapses
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False)  # depthwise residual: collapses
        self.shared = nn.Conv2d(8, 16, 3, padding=1)  # output used twice: stays
        self.wide = nn.Conv2d(16, 64, 1)  # 16->64 after 8->16: collapsing adds parameters... checked below
        self.offset = nn.Parameter(torch.randn(1, 64, 1, 1))
        self.fc1 = nn.Linear(64, 32)
        self.fc2 = nn.Linear(32, 10)  # linear -> linear: collapses (64*10 <= 64*32 + 32*10)

    def forward(self, x):
        y = self.point(self.bn(self.stem(x)))
        y = self.res(y) + y
        y = y + self.dw(y)
        s = self.shared(y)
        y = self.wide(torch.relu(s)) + self.offset + s.mean()  # relu between: stays; + param: folds
        y = F.adaptive_avg_pool2d(y, 1).flatten(1)
        return self.fc2(self.fc1(y)) + 0.5  # + constant folds into fc2's bias


def _functional(model, x):
    gm = trace(model, ((x,), {}))
    functionalize_layers(gm)
    fold_batchnorm(gm)
    return gm


def _randomised(model):
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2)
            m.weight.data.uniform_(0.5, 1.5)
    return model.eval()


def test_collapsing_keeps_the_float_function_and_removes_layers():
    model = _randomised(Collapsible())
    x = torch.randn(4, 3, 32, 32)
    gm = _functional(model, x)
    layers = lambda: [n.name for n in gm.graph.nodes if n.target in (F.conv2d, F.linear)]  # noqa: E731
    before = layers()
    assert collapse_linear_layers(gm) == 4  # stem->point, fc1->fc2, fc2 + 0.5, wide + offset
    assert collapse_residuals(gm) == 2
    after = layers()
    assert set(before) - set(after) == {"stem", "fc1"}
    adds = [n for n in gm.graph.nodes if n.target in (torch.add, operator.add)]
    assert len(adds) == 1  # only "+ s.mean()" stays (not a per-channel constant of a layer)
    with torch.no_grad():
        assert torch.allclose(gm(x), model(x), atol=1e-5)


def test_look_alikes_stay():
    class NotCollapsible(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(4, 4, 3, padding=1)
            self.b = nn.Conv2d(4, 4, 1, stride=2)  # strided 1x1: not pointwise
            self.c = nn.Conv2d(4, 4, 3, padding=0)  # shrinks: residual impossible
            self.d = nn.Conv2d(4, 8, 3, padding=1)  # channel change: no residual
            self.e = nn.Conv2d(4, 4, 1)

        def forward(self, x):
            y = self.b(self.a(x))
            z = self.c(y)
            w = self.e(y)
            return z.sum() + self.d(y).sum() + (w + self.a(x)[:, :, ::2, ::2]).sum()

    x = torch.randn(2, 4, 16, 16)
    gm = _functional(NotCollapsible().eval(), x)
    assert collapse_linear_layers(gm) == 0
    assert collapse_residuals(gm) == 0


def test_collapsing_on_mobilenet_v3_keeps_outputs():
    model = torchvision.models.mobilenet_v3_small(weights=None)
    zoo.reestimate_bn(model, 64)
    x = zoo.images(2, 64, seed=3)
    gm = _functional(model, x)
    assert collapse_linear_layers(gm) == 1  # features.1 project 1x1 -> features.2 expand 1x1
    with torch.no_grad():
        assert torch.allclose(gm(x), model(x), atol=1e-5, rtol=1e-4)


def test_quantize_collapses_by_default():
    """Fewer quantized layers and activations; the quantized model still tracks the float one."""
    torch.manual_seed(0)
    model = _randomised(Collapsible())
    data = [torch.randn(8, 3, 32, 32) for _ in range(4)]

    def quantized(config):
        q = mct_fx.quantize(model, data, "imx500", config, verbose=False)
        counts = [sum(isinstance(m, cls) for m in q.modules())
                  for cls in (mct_fx.ActivationQuantizer, mct_fx.WeightQuantizer)]
        with torch.no_grad():
            err = max(float((q(b) - model(b)).abs().max() / model(b).abs().max()) for b in data)
        return counts, err

    (acts_on, weights_on), err_on = quantized(mct_fx.QuantConfig())
    (acts_off, weights_off), err_off = quantized(mct_fx.QuantConfig(linear_collapsing=False,
                                                                    residual_collapsing=False))
    assert acts_off - acts_on == 6  # stem, fc1, two residual adds, two constant adds
    assert weights_off - weights_on == 2  # the kernels of stem and fc1
    assert err_on < 0.05 and err_off < 0.05
