"""Hutchinson estimates against the exact JᵀJ diagonal / trace, computed with torch.func."""

import pytest
import torch
from torch import nn
from torch.func import functional_call, jacrev

import mct_fx
from mct_fx.hessian import Granularity, HessianConfig, HessianService

# Hutchinson's diagonal has a relative standard deviation of about sqrt(2 / iterations) per
# element; with 3000 draws the whole-tensor relative error is a few percent.
EXACT = HessianConfig(max_iterations=3000, min_iterations=3000, seed=1)


class Small(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, padding=1)
        self.fc = nn.Linear(3 * 4 * 4, 5)

    def forward(self, x):
        return self.fc(torch.flatten(torch.tanh(self.conv(x)), 1))


def _float_graph(model, x):
    return mct_fx.prepare(model, x, "noquant")


def _node(gm, target_text):
    return next(n for n in gm.graph.nodes if target_text in str(n.target) and n.op == "call_function")


def _rel(a, b):
    return float((a.detach() - b.detach()).norm() / b.detach().norm())


def _exact_activation_diag(model, x):
    """Per image diag(JᵀJ) of the conv output (before tanh), by brute force."""
    diags = []
    for xi in x:
        a = model.conv(xi[None])
        jac = jacrev(lambda a: model.fc(torch.flatten(torch.tanh(a), 1)))(a)  # [1, 5, 1, 3, 4, 4]
        diags.append(jac.reshape(5, -1).pow(2).sum(0).reshape(a.shape[1:]))
    return torch.stack(diags)


def _exact_weight_diag(model, x, name):
    params = dict(model.named_parameters())
    diags = []
    for xi in x:
        def f(w, xi=xi):
            return functional_call(model, {**params, name: w}, (xi[None],))[0]
        diags.append(jacrev(f)(params[name]).reshape(5, *params[name].shape).pow(2).sum(0))
    return torch.stack(diags).mean(0)


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    model = Small().eval()
    x = torch.randn(6, 2, 4, 4)
    gm = _float_graph(model, x)
    return model, x, gm


def test_activation_diag_and_trace_match_exact(setup):
    model, x, gm = setup
    conv = _node(gm, "conv2d")
    service = HessianService(gm, [x[:4], x[4:]], EXACT)
    exact = _exact_activation_diag(model, x)
    diag = service.activations([conv], Granularity.PER_ELEMENT)[conv.name]
    assert diag.shape == exact.shape
    assert _rel(diag, exact) < 0.05
    trace = service.activations([conv])[conv.name]
    assert trace.shape == (6,)
    assert _rel(trace, exact.sum((1, 2, 3))) < 0.02
    per_channel = service.activations([conv], "per_channel")[conv.name]
    assert per_channel.shape == (6, 3)
    assert _rel(per_channel, exact.sum((2, 3))) < 0.03


def test_weight_diag_and_channel_sums_match_exact(setup):
    model, x, gm = setup
    conv, fc = _node(gm, "conv2d"), _node(gm, "linear")
    service = HessianService(gm, [x], EXACT)
    got = service.weights([conv, fc], Granularity.PER_ELEMENT)  # both layers in one backward pass
    exact_conv = _exact_weight_diag(model, x, "conv.weight")
    exact_fc = _exact_weight_diag(model, x, "fc.weight")
    assert got[conv.name].shape == exact_conv.shape
    # the batch estimator sums J_b^T v_b over images before squaring: noisier, still unbiased
    assert _rel(got[conv.name], exact_conv) < 0.1
    assert _rel(got[fc.name], exact_fc) < 0.1
    per_channel = service.weights([conv], "per_channel")[conv.name]
    assert _rel(per_channel, exact_conv.sum((1, 2, 3))) < 0.1
    assert not any(p.requires_grad is False for p in model.parameters())  # flags restored on the graph copy
    assert all(p.requires_grad for p in gm.parameters())


def test_seeded_runs_repeat_and_cache_is_used(setup):
    _, x, gm = setup
    conv = _node(gm, "conv2d")
    cfg = HessianConfig(max_iterations=20, seed=3)
    a = HessianService(gm, [x], cfg).activations([conv])[conv.name]
    b = HessianService(gm, [x], cfg).activations([conv])[conv.name]
    assert torch.equal(a, b)
    other = HessianService(gm, [x], HessianConfig(max_iterations=20, seed=4)).activations([conv])[conv.name]
    assert not torch.equal(a, other)
    service = HessianService(gm, [x], cfg)
    first = service.activations([conv])[conv.name]
    assert service.activations([conv.name])[conv.name] is first  # cached per node and granularity


def test_tolerance_stops_early(setup):
    _, x, gm = setup
    conv = _node(gm, "conv2d")
    calls = []
    service = HessianService(gm, [x], HessianConfig(max_iterations=500, min_iterations=5, tolerance=0.05))
    original = torch.autograd.grad

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    torch.autograd.grad = counting
    try:
        service.activations([conv])
    finally:
        torch.autograd.grad = original
    assert 5 <= len(calls) < 500


def test_bad_targets_are_named(setup):
    _, x, gm = setup
    service = HessianService(gm, [x])
    with pytest.raises(KeyError, match="no_such"):
        service.activations(["no_such"])
    tanh = next(n for n in gm.graph.nodes if "tanh" in str(n.target))
    with pytest.raises(ValueError, match=tanh.name):
        service.weights([tanh])
    with pytest.raises(ValueError, match="min_iterations"):
        HessianConfig(max_iterations=3, min_iterations=5)


def test_hmse_ignores_weights_the_output_cannot_see():
    """fc2's large weights read features that ReLU always zeroes: HMSE clips them, MSE spends its grid on them."""

    class Dead(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1 = nn.Linear(8, 8)
            self.fc2 = nn.Linear(8, 4)

        def forward(self, x):
            return self.fc2(torch.relu(self.fc1(x)))

    torch.manual_seed(0)
    model = Dead().eval()
    with torch.no_grad():
        model.fc1.weight[4:] = 0
        model.fc1.bias[4:] = -1  # features 4..7 are always 0 after the ReLU
        model.fc2.weight[:, 4:] = 20.0
    calib = [torch.randn(32, 8) for _ in range(2)]
    x = torch.randn(256, 8)
    errors = {}
    for method in ("mse", "hmse"):
        config = mct_fx.QuantConfig(weights_error_method=method,
                                    overrides=(mct_fx.LayerOverride(name="fc2", weights_n_bits=4),))
        qmodel = mct_fx.quantize(model, calib, "imx500", config, verbose=False)
        with torch.no_grad():
            errors[method] = float((qmodel(x) - model(x)).pow(2).mean())
    assert errors["hmse"] < 0.25 * errors["mse"]


def test_hmse_is_for_weights_only():
    with pytest.raises(ValueError, match="weights only"):
        mct_fx.QuantConfig(activation_error_method="hmse")
    with pytest.raises(ValueError, match="weights only"):
        mct_fx.LayerOverride(name="x", activation_error_method="hmse")
