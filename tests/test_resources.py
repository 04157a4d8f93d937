"""Resource utilization against values computed by hand (small graph) and by an independent count (resnet18)."""

import pytest
import torch
import torchvision
from torch import nn

import mct_fx
from mct_fx.resources import CostModel, ResourceUtilization


class Chain(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 4, 1)
        self.fc = nn.Linear(4 * 8 * 8, 10)

    def forward(self, x):
        return self.fc(torch.flatten(self.c2(torch.relu(self.c1(x))), 1))


def test_small_graph_by_hand():
    ru = mct_fx.resource_utilization(Chain().eval(), torch.randn(4, 3, 8, 8), "imx500")
    # kernels at 8 bits (1 byte per element), biases float (4 bytes)
    assert ru.weights_memory == 8 * 3 * 9 + 4 * 8 + 4 * 8 + 4 * 4 + 10 * 256 + 4 * 10
    # per sample, 1 byte per element: input 192, relu(c1) 512, c2 256, fc 10; peak while c2 runs:
    # its input (512) and its output (256) are alive together
    assert ru.activation_memory == 512 + 256
    assert ru.total_memory == ru.weights_memory + ru.activation_memory
    macs = 8 * 64 * 27 + 4 * 64 * 8 + 10 * 256
    assert ru.bops == macs * 8 * 8


def test_noquant_counts_everything_as_float():
    ru = mct_fx.resource_utilization(Chain().eval(), torch.randn(2, 3, 8, 8), "noquant")
    params = sum(p.numel() for p in Chain().parameters())
    assert ru.weights_memory == 4 * params
    # nothing fused here: c1's output and the ReLU's are alive together
    assert ru.activation_memory == 4 * (512 + 512)
    assert ru.bops == (8 * 64 * 27 + 4 * 64 * 8 + 10 * 256) * 32 * 32


def test_fused_group_keeps_its_input_alive():
    # the input (192 B) is read by c1 and stays alive until relu(c1) (512 B) exists
    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1 = nn.Conv2d(3, 8, 3, padding=1)

        def forward(self, x):
            return torch.relu(self.c1(x))

    ru = mct_fx.resource_utilization(Two().eval(), torch.randn(1, 3, 8, 8))
    assert ru.activation_memory == 192 + 512


def test_quantized_model_is_measured_with_its_bits():
    model = Chain().eval()
    x = torch.randn(8, 3, 8, 8)
    qmodel = mct_fx.quantize(model, [x], "imx500", mct_fx.QuantConfig(overrides=(
        mct_fx.LayerOverride(name="fc", weights_n_bits=4),)), verbose=False)
    ru = mct_fx.resource_utilization(qmodel)
    assert ru.weights_memory == 8 * 3 * 9 + 4 * 8 + 4 * 8 + 4 * 4 + 10 * 256 // 2 + 4 * 10


def _resnet18_by_count(x):
    """Kernels (1 byte), folded-BN biases and fc bias (4 bytes), MACs from module hooks, at 8 bits."""
    model = torchvision.models.resnet18().eval()
    kernels = sum(m.weight.numel() for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear)))
    biases = sum(m.out_channels for m in model.modules() if isinstance(m, nn.Conv2d)) + 1000
    macs = []

    def hook(m, inp, out):
        per_out = m.weight.numel() // m.weight.shape[0]
        macs.append(out[0].numel() * per_out)

    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            m.register_forward_hook(hook)
    with torch.no_grad():
        model(x[:1])
    return model, kernels + 4 * biases, sum(macs) * 64


def test_resnet18():
    x = torch.randn(2, 3, 224, 224)
    model, weights, bops = _resnet18_by_count(x)
    ru = mct_fx.resource_utilization(model, x)
    assert ru.weights_memory == weights
    assert ru.bops == bops
    # peak: the stem's 64x112x112 output read by max-pool while its 64x56x56 output is written
    assert ru.activation_memory == 64 * 112 * 112 + 64 * 56 * 56


def test_target_validation_and_exceeds():
    with pytest.raises(ValueError, match="weights_memory"):
        ResourceUtilization(weights_memory=-1)
    with pytest.raises(ValueError, match="bops"):
        ResourceUtilization(bops="many")
    ru = ResourceUtilization(weights_memory=10, activation_memory=5, total_memory=15, bops=100)
    assert ru.exceeds(ResourceUtilization(weights_memory=9)) == ["weights_memory"]
    assert ru.exceeds(ResourceUtilization(bops=100, activation_memory=6)) == []


def test_cost_model_choice_overrides_annotations():
    gm = mct_fx.prepare(Chain().eval(), torch.randn(1, 3, 8, 8))
    costs = CostModel(gm)
    fc = next(n for n in gm.graph.nodes if n.op == "call_function" and n.target is torch.nn.functional.linear)
    config = next(c for c in fc.meta["mct_fx"].options.candidates if c.kernel.n_bits == 2)
    base = costs.evaluate()
    two_bit = costs.evaluate({fc.name: config})
    assert base.weights_memory - two_bit.weights_memory == 10 * 256 * 6 / 8
    assert base.bops - two_bit.bops == 10 * 256 * 6 * 8
