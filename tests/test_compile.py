"""torch.compile on quantized models: one graph, eager-equal results, a compiled QAT-style training step."""

import pytest
import torch
from torch import nn

import mct_fx
from mct_fx import kernels

import zoo


@pytest.fixture(scope="module")
def quantized_resnet18():
    model, side = zoo.build("resnet18")
    return mct_fx.quantize(model, zoo.calibration(side, n_batches=2), "imx500", verbose=False), zoo.evaluation(side, 4)


def test_quantized_resnet18_is_one_graph_and_matches_eager(quantized_resnet18):
    q, x = quantized_resnet18
    explanation = torch._dynamo.explain(q)(x)
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1
    compiled = torch.compile(q, backend="aot_eager", fullgraph=True)
    with torch.no_grad():
        assert torch.equal(compiled(x), q(x))


@pytest.mark.slow
def test_inductor_runs_and_agrees_with_eager(quantized_resnet18):
    # inductor reorders the float math between fake-quant ops, so values on rounding boundaries move by
    # a quantization step (and random-weight nets amplify that); outputs agree closely, not bit for bit
    q, x = quantized_resnet18
    with torch.no_grad():
        ref, out = q(x), torch.compile(q, fullgraph=True)(x)
    assert zoo.sqnr_db(ref, out) > 25


class LSQConv(nn.Module):
    """A QAT-style layer: weights fake-quantized with a learnable per-channel scale (LSQ)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.scale = nn.Parameter(self.conv.weight.detach().abs().amax((1, 2, 3)) / 7)
        self.register_buffer("zero", torch.zeros(8))
        self.act_scale = nn.Parameter(torch.tensor(0.05))

    def forward(self, x):
        w = kernels.fake_quant(self.conv.weight, self.scale, self.zero, -8, 7, 0)
        y = torch.relu(nn.functional.conv2d(x, w, self.conv.bias, padding=1))
        return kernels.fake_quant(y, self.act_scale, torch.zeros(()), 0, 255).mean((2, 3))


def test_compiled_training_step_matches_eager():
    torch.manual_seed(0)
    x, target = torch.randn(4, 3, 8, 8), torch.randn(4, 8)
    eager, compiled_model = LSQConv(), LSQConv()
    compiled_model.load_state_dict(eager.state_dict())
    step = torch.compile(compiled_model, backend="aot_eager", fullgraph=True)
    grads = []
    for model, run in ((eager, eager), (compiled_model, step)):
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        loss = nn.functional.mse_loss(run(x), target)
        loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
        opt.step()
    assert all(torch.equal(grads[0][n], grads[1][n]) for n in grads[0])
    assert grads[0]["scale"].abs().sum() > 0 and grads[0]["act_scale"].abs() > 0  # LSQ gradients flow
    assert all(torch.equal(a, b) for a, b in zip(eager.parameters(), compiled_model.parameters(), strict=True))
