"""Graph passes: functional form, BN folding, bias correction, quantizer insertion."""

import pytest
import torch
import torchvision
from torch import nn

from mct_fx.passes import fold_batchnorm, functionalize_layers, insert_quantizers
from mct_fx.passes.bias_correction import add_missing_biases
from mct_fx.quantizers import ActivationQuantizer, WeightQuantizer
from mct_fx.tpc import get_tpc
from mct_fx.tpc.matching import annotate
from mct_fx.trace import trace

import zoo


def _prepared(model, x):
    gm = trace(model, ((x,), {}))
    functionalize_layers(gm)
    return gm


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2", "efficientnet_b0"])
def test_bn_folding_keeps_outputs(name):
    model = torchvision.models.get_model(name, weights=None)
    zoo.reestimate_bn(model, 64)
    x = zoo.images(4, 64, seed=5)
    gm = _prepared(model, x)
    n_bn = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert fold_batchnorm(gm) == n_bn
    assert not any(isinstance(m, nn.BatchNorm2d) for m in gm.modules())
    with torch.no_grad():
        ref, out = model(x), gm(x)
    assert torch.allclose(out, ref, atol=1e-5, rtol=1e-4)


class Mixed(nn.Module):
    """ConvTranspose+BN, grouped conv without bias + BN, Linear+BN1d, reflect padding, a shared BN input."""

    def __init__(self):
        super().__init__()
        self.up = nn.ConvTranspose2d(4, 6, 3, stride=2, groups=2)
        self.bn_up = nn.BatchNorm2d(6)
        self.gconv = nn.Conv2d(6, 6, 3, groups=3, bias=False, padding=1, padding_mode="reflect")
        self.bn_g = nn.BatchNorm2d(6)
        self.conv = nn.Conv2d(6, 6, 1)
        self.bn_shared = nn.BatchNorm2d(6)  # its input also feeds the add: not foldable
        self.fc = nn.Linear(6, 5)
        self.bn_fc = nn.BatchNorm1d(5)

    def forward(self, x):
        y = self.bn_g(self.gconv(self.bn_up(self.up(x))))
        c = self.conv(y)
        y = self.bn_shared(c) + c
        return self.bn_fc(self.fc(y.mean((2, 3))))


def _randomise_bn(model):
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.5, 0.5)


def test_bn_folding_variants_and_unfoldable_bn():
    model = Mixed().eval()
    _randomise_bn(model)
    x = torch.randn(2, 4, 5, 5)
    gm = _prepared(model, x)
    assert fold_batchnorm(gm) == 3
    remaining = [n.target for n in gm.graph.nodes if n.op == "call_module"]
    assert remaining == ["bn_shared"]
    with torch.no_grad():
        assert torch.allclose(gm(x), model(x), atol=1e-5)


def test_functional_form_keeps_names_and_outputs():
    model = Mixed().eval()
    x = torch.randn(2, 4, 5, 5)
    gm = _prepared(model, x)
    names = {n.name: n for n in gm.graph.nodes}
    assert names["gconv"].op == "call_function" and names["fc"].op == "call_function"
    assert "self.gconv.weight" in gm.code or 'gconv.weight' in gm.code
    assert set(gm.state_dict()) >= {k for k in model.state_dict() if not k.startswith("bn")}
    with torch.no_grad():
        assert torch.allclose(gm(x), model(x), atol=1e-6)


def test_insertion_follows_annotations_and_bias_is_added():
    model = Mixed().eval()
    x = torch.randn(2, 4, 5, 5)
    gm = _prepared(model, x)
    fold_batchnorm(gm)
    annotate(gm, get_tpc("imx500"))
    insert_quantizers(gm)
    add_missing_biases(gm)
    weight_q = {n.target for n in gm.graph.nodes
                if n.op == "call_module" and isinstance(gm.get_submodule(n.target), WeightQuantizer)}
    assert weight_q == {"up_weight_quant", "gconv_weight_quant", "conv_weight_quant", "fc_weight_quant"}
    up_q = gm.get_submodule("up_weight_quant")
    assert up_q.axis == 1 and up_q.scale.shape == (3,)  # ConvTranspose: output channels on axis 1
    act_q = [n.target for n in gm.graph.nodes
             if n.op == "call_module" and isinstance(gm.get_submodule(n.target), ActivationQuantizer)]
    assert "x_act_quant" in act_q and "fc_act_quant" in act_q
    assert all(isinstance(p, nn.Parameter) for p in gm.parameters())
    # observing quantizers pass data through unchanged
    with torch.no_grad():
        assert torch.allclose(gm(x), model(x), atol=1e-5)
