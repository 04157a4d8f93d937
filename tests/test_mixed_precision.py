"""Mixed-precision search: the integer program against brute force, budgets, and the PTQ integration."""

import itertools
import math

import pytest
import torch
from torch import nn

import mct_fx
from mct_fx.mixed_precision.candidates import configurable_nodes
from mct_fx.mixed_precision.solver import MixedPrecisionError, solve
from mct_fx.resources import CostModel, ResourceUtilization

import zoo


class Stack(nn.Module):
    """conv -> relu -> conv -> conv -> pool -> fc: three to five configurable nodes depending on the target."""

    def __init__(self, deep: bool = True):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.c3 = nn.Conv2d(16, 16, 3, padding=1) if deep else nn.Identity()
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        x = torch.relu(self.c1(x))
        x = self.c3(self.c2(x))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


def _setup(tpc):
    # imx500: 4 layers x W8/W4/W2 (81 choices); imx500_16bit: 3 layers and 3 activations with A8/A16 too (864)
    gm = mct_fx.prepare(Stack(deep=tpc == "imx500").eval(), torch.randn(1, 3, 8, 8), tpc)
    return CostModel(gm), configurable_nodes(gm)


def _brute_force(costs, entries, sens, target):
    best = math.inf
    for choice in itertools.product(*[range(len(e.candidates)) for e in entries]):
        configs = {e.node: e.candidates[i] for e, i in zip(entries, choice, strict=True)}
        if costs.evaluate(configs).exceeds(target):
            continue
        best = min(best, sum(s[i] for s, i in zip(sens, choice, strict=True)))
    return best


def _objective(sens, choice):
    return sum(s[i] for s, i in zip(sens, choice, strict=True))


def _random_sensitivities(entries, seed):
    g = torch.Generator().manual_seed(seed)
    return [sorted(torch.rand(len(e.candidates), generator=g).tolist()) for e in entries]


def _fraction(costs, entries, field, fraction):
    """A budget between the smallest and the base utilization."""
    from mct_fx.mixed_precision.solver import smallest_achievable

    low, high = smallest_achievable(costs, entries, field), getattr(costs.evaluate(), field)
    return low + fraction * (high - low)


@pytest.mark.parametrize("tpc", ["imx500", "imx500_16bit"])
@pytest.mark.parametrize("field", ["weights_memory", "activation_memory", "total_memory", "bops"])
def test_integer_program_equals_brute_force(tpc, field):
    costs, entries = _setup(tpc)
    n_choices = math.prod(len(e.candidates) for e in entries)
    assert len(entries) >= 4 and n_choices <= 1000
    if field == "activation_memory" and tpc == "imx500":
        pytest.skip("imx500 has 8-bit activations only: nothing to choose")
    for seed, fraction in ((0, 0.3), (1, 0.6), (2, 0.05)):
        sens = _random_sensitivities(entries, seed)
        target = ResourceUtilization(**{field: _fraction(costs, entries, field, fraction)})
        choice = solve(costs, entries, sens, target, refine=False)
        chosen = costs.evaluate({e.node: e.candidates[i] for e, i in zip(entries, choice, strict=True)})
        assert not chosen.exceeds(target)
        assert _objective(sens, choice) == pytest.approx(_brute_force(costs, entries, sens, target), rel=1e-9)


def test_several_budgets_at_once_equal_brute_force():
    costs, entries = _setup("imx500_16bit")
    sens = _random_sensitivities(entries, 5)
    target = ResourceUtilization(weights_memory=_fraction(costs, entries, "weights_memory", 0.5),
                                 bops=_fraction(costs, entries, "bops", 0.5),
                                 activation_memory=_fraction(costs, entries, "activation_memory", 0.7))
    choice = solve(costs, entries, sens, target, refine=False)
    assert _objective(sens, choice) == pytest.approx(_brute_force(costs, entries, sens, target), rel=1e-9)


def test_unreachable_budget_names_the_smallest_achievable():
    costs, entries = _setup("imx500")
    least = costs.evaluate({e.node: e.candidates[-1] for e in entries}).weights_memory  # all at 2 bits
    with pytest.raises(MixedPrecisionError, match=f"smallest achievable .* is {least:.6g} bytes"):
        solve(costs, entries, _random_sensitivities(entries, 0), ResourceUtilization(weights_memory=least * 0.9))


def test_refinement_raises_bits_only_without_cost_in_sensitivity():
    costs, entries = _setup("imx500")
    flat = [[0.0] * len(e.candidates) for e in entries]  # every candidate equally good
    target = ResourceUtilization(weights_memory=costs.evaluate().weights_memory)
    refined = solve(costs, entries, flat, target, refine=True)
    assert refined == [0] * len(entries)  # the base (8-bit) everywhere fits: taken


@pytest.fixture(scope="module")
def small_search():
    """One mixed-precision PTQ run on a random-weight resnet18 (BN re-estimated), 64x64 images."""
    torch.manual_seed(0)
    model, side = zoo.build("resnet18")
    calib = zoo.calibration(64, n_batches=4, batch_size=8)
    base = mct_fx.resource_utilization(model, calib[0])
    costs_gm = mct_fx.prepare(model, calib[0])
    costs, entries = CostModel(costs_gm), configurable_nodes(costs_gm)
    four_bit = costs.evaluate({e.node: next(c for c in e.candidates if c.kernel.n_bits == 4) for e in entries})
    target = ResourceUtilization(weights_memory=four_bit.weights_memory)
    qmodel = mct_fx.quantize(model, calib, "imx500", target=target, verbose=False)
    return model, calib, base, target, qmodel, costs, entries


def test_quantize_with_target_meets_it_and_reports(small_search):
    model, calib, base, target, qmodel, _, entries = small_search
    ru = mct_fx.resource_utilization(qmodel)
    assert ru.weights_memory <= target.weights_memory
    summary = mct_fx.summary(qmodel)
    mp = summary.mixed_precision
    assert mp is not None and set(mp.bits) == {e.node for e in entries}
    assert len(set(mp.bits.values())) > 1  # really mixed: neither all-8 (too big) nor all-2 (too bad)
    assert "mixed precision" in str(summary) and "achieved" in str(summary)
    weights = [l.weights for l in summary.layers if l.weights != "-"]
    assert any(w.startswith("2b") or w.startswith("4b") for w in weights)
    # 2-bit weights hurt more than 4-bit ones almost everywhere
    worse = [node for node in mp.bits if mp.sensitivity[node]["W2"] > mp.sensitivity[node]["W4"]]
    assert len(worse) >= 0.9 * len(mp.bits)


def test_tighter_budgets_never_give_larger_models(small_search):
    model, calib, base, target, qmodel, costs, entries = small_search
    mp = mct_fx.summary(qmodel).mixed_precision
    sens = [[mp.sensitivity[e.node][e.describe(i)] for i in range(len(e.candidates))] for e in entries]
    low = costs.evaluate({e.node: e.candidates[-1] for e in entries}).weights_memory
    high = costs.evaluate().weights_memory
    sizes = []
    for f in (1.0, 0.8, 0.6, 0.45, 0.3, 0.2, 0.1, 0.0):
        budget = ResourceUtilization(weights_memory=low + f * (high - low))
        choice = solve(costs, entries, sens, budget)
        size = costs.evaluate({e.node: e.candidates[i] for e, i in zip(entries, choice, strict=True)}).weights_memory
        assert size <= budget.weights_memory
        sizes.append(size)
    assert sizes == sorted(sizes, reverse=True)


def test_mixed_beats_uniform_four_bit_at_the_same_size(small_search):
    model, calib, _, target, qmodel, _, _ = small_search
    uniform = mct_fx.quantize(model, calib, "imx500", mct_fx.QuantConfig(overrides=(
        mct_fx.LayerOverride(op="Conv", weights_n_bits=4), mct_fx.LayerOverride(op="FullyConnected",
                                                                                 weights_n_bits=4))),
        verbose=False)
    assert mct_fx.resource_utilization(uniform).weights_memory == pytest.approx(target.weights_memory)
    x = zoo.evaluation(64)
    with torch.no_grad():
        ref = model(x)
        err_mixed = (qmodel(x) - ref).pow(2).mean()
        err_uniform = (uniform(x) - ref).pow(2).mean()
    assert err_mixed < err_uniform


def test_bad_target_fails_before_calibration():
    model = Stack().eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    seen = []

    def loader():
        for i in range(3):
            seen.append(i)
            yield torch.randn(4, 3, 8, 8)

    with pytest.raises(MixedPrecisionError, match="weights_memory"):
        mct_fx.quantize(model, loader(), target=ResourceUtilization(weights_memory=10), verbose=False)
    assert seen == [0]  # only the example batch was read
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    with pytest.raises(TypeError, match="ResourceUtilization"):
        mct_fx.quantize(model, [torch.randn(2, 3, 8, 8)], target={"weights_memory": 10}, verbose=False)
    with pytest.raises(ValueError, match="at least one"):
        mct_fx.quantize(model, [torch.randn(2, 3, 8, 8)], target=ResourceUtilization(), verbose=False)


def test_distance_weightings_each_measure_differently():
    torch.manual_seed(0)
    model = Stack().eval()
    calib = [torch.randn(8, 3, 8, 8) for _ in range(2)]
    costs, entries = _setup("imx500")
    target = ResourceUtilization(weights_memory=_fraction(costs, entries, "weights_memory", 0.5))
    seen = []
    for weighting in mct_fx.DistanceWeighting:
        config = mct_fx.QuantConfig(mixed_precision=mct_fx.MixedPrecisionConfig(
            n_images=8, distance_weighting=weighting, hessian=mct_fx.HessianConfig(max_iterations=10)))
        qmodel = mct_fx.quantize(model, calib, "imx500", config, target=target, verbose=False)
        mp = mct_fx.summary(qmodel).mixed_precision
        assert mct_fx.resource_utilization(qmodel).weights_memory <= target.weights_memory
        assert all(v["W2"] > v["W8"] for v in mp.sensitivity.values())
        seen.append(tuple(round(v, 12) for s in mp.sensitivity.values() for v in s.values()))
    assert len(set(seen)) == len(seen)


def _frozen_stack():
    """(float model, its calibration batches, the frozen PTQ graph, a search with every candidate frozen)."""
    from mct_fx.mixed_precision.search import MixedPrecisionSearch
    from mct_fx.passes import calibrate, freeze_quantizers

    torch.manual_seed(0)
    model = Stack().eval()
    calib = [torch.randn(8, 3, 8, 8) for _ in range(2)]
    gm = mct_fx.prepare(model, calib[0])
    search = MixedPrecisionSearch(gm, ResourceUtilization(weights_memory=1e9), mct_fx.QuantConfig())
    calibrate(gm, [((x,), {}) for x in calib], verbose=False)
    search.keep_histograms()
    freeze_quantizers(gm, mct_fx.QuantConfig())
    search._alternatives.build(mct_fx.QuantConfig())
    return model, calib, gm, search


@pytest.mark.parametrize("correction", ["bias", "second-moment"])
def test_partial_rerun_equals_a_full_run(correction):
    """measure() re-runs only what a change reaches; applying the change and measuring gives the same,
    with either weight correction applied per candidate (the second-moment one rescales kernels in place)."""
    from mct_fx.mixed_precision.corrections import CandidateBiases, CandidateMoments
    from mct_fx.mixed_precision.search import _Swap
    from mct_fx.mixed_precision.sensitivity import SensitivityEvaluator

    _, calib, gm, search = _frozen_stack()
    images = [((torch.cat(calib),), {})]
    evaluator = SensitivityEvaluator(gm, images, chunk=4)
    params = {k: v.clone() for k, v in gm.state_dict().items() if isinstance(v, torch.Tensor)}
    fix = (CandidateBiases(gm, {}, mct_fx.QuantConfig()) if correction == "bias"
           else CandidateMoments(gm, search.entries, images))
    changes = [_Swap(evaluator.probe, fix, e, i) for e in search.entries for i in range(1, len(e.candidates))]
    partial = evaluator.measure(changes)
    for change, expected in zip(changes, partial[1:], strict=True):
        change.apply()
        try:
            full = evaluator.measure()[0]
        finally:
            change.revert()
        assert full == pytest.approx(expected, rel=1e-6)
    assert evaluator.measure()[0] == pytest.approx(partial[0], rel=1e-9)
    assert len(set(partial)) == len(partial)  # every candidate moved the distance
    fix.restore()
    for k, v in params.items():
        assert torch.equal(gm.state_dict()[k], v), k


def test_second_moment_candidates_get_the_float_output_moments():
    """Each grid of a layer, base or candidate, gives its output the float per-channel mean and variance on the
    images measured (inputs float); restore() puts every kernel, bias and grid back."""
    from mct_fx.mixed_precision.corrections import CandidateMoments

    model, calib, gm, search = _frozen_stack()
    params = {k: v.clone() for k, v in gm.state_dict().items() if isinstance(v, torch.Tensor)}
    x = torch.cat(calib)
    entry = next(e for e in search.entries if e.node == "c1")
    reference = nn.functional.conv2d(x, model.c1.weight, model.c1.bias, padding=1)
    fix = CandidateMoments(gm, search.entries, [((x,), {})])
    grids = {0: gm.c1_weight_quant} | {i: entry.quantizers[i]["weight"] for i in range(1, len(entry.candidates))}
    assert sorted(q.n_bits for q in grids.values()) == [2, 4, 8]
    for index, q in grids.items():
        fix.use_candidate(entry, index) if index else fix.use_base(entry)
        with torch.no_grad():
            y = nn.functional.conv2d(x, q(gm.c1.weight), gm.c1.bias, padding=1)
        r = torch.sqrt(reference.var((0, 2, 3), unbiased=False) / y.var((0, 2, 3), unbiased=False))
        torch.testing.assert_close(y.mean((0, 2, 3)), reference.mean((0, 2, 3)), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(r, torch.ones_like(r), rtol=1e-4, atol=0)
        fix.use_base(entry)
    fix.restore()
    for k, v in params.items():
        assert torch.equal(gm.state_dict()[k], v), k


def test_search_runs_again_when_the_result_keeps_bias_correction(monkeypatch):
    """``auto`` measures candidates under second-moment correction; if the chosen model then keeps bias
    correction, the first choice is undone and the search runs under bias correction: the result is bit for
    bit the model that ``weights_second_moment_correction=False`` gives."""
    import dataclasses

    import torchvision

    from mct_fx import ptq
    from mct_fx.mixed_precision.search import MixedPrecisionSearch

    torch.manual_seed(0)
    model = torchvision.models.regnet_x_400mf(weights=None)
    zoo.reestimate_bn(model, 32)
    model.eval()
    calib = [zoo.images(8, 32, seed=s) for s in range(4)]
    gm = mct_fx.prepare(model, calib[0])
    costs, entries = CostModel(gm), configurable_nodes(gm)
    target = ResourceUtilization(weights_memory=_fraction(costs, entries, "weights_memory", 0.3))
    config = mct_fx.QuantConfig(mixed_precision=mct_fx.MixedPrecisionConfig(n_images=16))
    bias_only = dataclasses.replace(config, weights_second_moment_correction=False)
    direct = mct_fx.quantize(model, calib, "imx500", bias_only, target=target, verbose=False)

    real_correct, real_run = ptq.correct_weight_errors, MixedPrecisionSearch.run
    corrections, searches = [], []

    def bias_wins(gm, batches, input_means, config):
        corrections.append(config.weights_second_moment_correction)
        return real_correct(gm, batches, input_means, bias_only)

    def run(self, images, input_means, correction, **kwargs):
        result = real_run(self, images, input_means, correction, **kwargs)
        searches.append((correction, result.bits))
        return result

    monkeypatch.setattr(ptq, "correct_weight_errors", bias_wins)
    monkeypatch.setattr(MixedPrecisionSearch, "run", run)
    retried = mct_fx.quantize(model, calib, "imx500", config, target=target, verbose=False)
    assert [c for c, _ in searches] == ["second-moment", "bias"] and corrections == ["auto", "auto"]
    assert searches[0][1] != searches[1][1]  # the first search chose other bits: undo() had something to undo
    assert searches[1][1] == mct_fx.summary(direct).mixed_precision.bits
    assert retried.meta["mct_fx.weight_correction"] == direct.meta["mct_fx.weight_correction"] == "bias"
    x = torch.cat(calib)
    with torch.no_grad():
        assert torch.equal(retried(x), direct(x))


def _mixed_vs_uniform_four_bit(model, calib, evaluate):
    """(mixed precision at the uniform-4-bit weights size, uniform W4A8), each scored by ``evaluate``."""
    import compare

    budget = compare.weight_budgets(model, calib[:1])[4]["mct_fx"]
    batches = compare._batches(calib)
    mixed = mct_fx.quantize(model, batches, "imx500", target=ResourceUtilization(weights_memory=budget),
                            verbose=False)
    uniform = mct_fx.quantize(model, batches, "imx500", mct_fx.QuantConfig(overrides=(
        mct_fx.LayerOverride(op="Conv", weights_n_bits=4), mct_fx.LayerOverride(op="FullyConnected",
                                                                                 weights_n_bits=4))),
        verbose=False)
    assert mct_fx.resource_utilization(mixed).weights_memory <= budget
    assert mct_fx.resource_utilization(uniform).weights_memory == pytest.approx(budget)
    return evaluate(mixed), evaluate(uniform)


@pytest.mark.slow
def test_fashion_mnist_resnet_mixed_beats_uniform_four_bit():
    import train_fmnist

    import assets

    if not assets.fashion_mnist_available():
        pytest.skip("Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")
    model, _ = train_fmnist.load("fmnist_resnet")  # trains and caches it when missing (~10 min)
    x, _ = assets.fashion_mnist("train")
    xt, yt = assets.fashion_mnist("test")
    calib = x[torch.randperm(len(x), generator=torch.Generator().manual_seed(0))[:512]]

    def accuracy(q):
        with torch.no_grad():
            return float((torch.cat([q(b) for b in xt.split(500)]).argmax(1) == yt).float().mean()) * 100

    mixed, uniform = _mixed_vs_uniform_four_bit(model, calib, accuracy)
    assert mixed > uniform + 1.0, (mixed, uniform)


@pytest.mark.slow
def test_imagenet_mobilenet_v2_mixed_beats_uniform_four_bit():
    import torchvision

    import assets

    try:
        assets.mobilenet_v2_weights()
        calib, crops = assets.imagenet_fidelity_sets(256, 128)
    except assets.MissingAsset as e:
        pytest.skip(str(e))
    model = torchvision.models.mobilenet_v2(weights="IMAGENET1K_V1").eval()
    with torch.no_grad():
        ref = model(crops).argmax(1)

    def agreement(q):
        with torch.no_grad():
            return float((q(crops).argmax(1) == ref).float().mean()) * 100

    mixed, uniform = _mixed_vs_uniform_four_bit(model, calib, agreement)
    assert mixed > uniform + 5.0, (mixed, uniform)


def test_overridden_bits_are_pinned():
    torch.manual_seed(0)
    model = Stack().eval()
    calib = [torch.randn(8, 3, 8, 8) for _ in range(2)]
    costs, entries = _setup("imx500")
    target = ResourceUtilization(weights_memory=_fraction(costs, entries, "weights_memory", 0.2))
    config = mct_fx.QuantConfig(overrides=(mct_fx.LayerOverride(name="fc", weights_n_bits=8),),
                                mixed_precision=mct_fx.MixedPrecisionConfig(n_images=8))
    qmodel = mct_fx.quantize(model, calib, "imx500", config, target=target, verbose=False)
    mp = mct_fx.summary(qmodel).mixed_precision
    assert "fc" not in mp.bits and set(mp.bits) == {"c1", "c2", "c3"}
    assert next(layer for layer in mct_fx.summary(qmodel).layers if layer.node == "fc").weights.startswith("8b")


def test_activation_bits_are_chosen_and_applied():
    """imx500_16bit: an activation budget between the 8-bit and the 16-bit sizes buys 16 bits where it helps most."""
    torch.manual_seed(0)
    model = Stack(deep=False).eval()
    calib = [torch.randn(8, 3, 8, 8) for _ in range(2)]
    costs, entries = _setup("imx500_16bit")
    base = costs.evaluate().activation_memory
    all16 = costs.evaluate({e.node: next(c for c in e.candidates if c.activation_n_bits == 16 and (
        not e.weights or c.kernel.n_bits == 8)) for e in entries if e.activation}).activation_memory
    target = ResourceUtilization(activation_memory=(base + all16) / 2)
    config = mct_fx.QuantConfig(mixed_precision=mct_fx.MixedPrecisionConfig(n_images=8))
    qmodel = mct_fx.quantize(model, calib, "imx500_16bit", config, target=target, verbose=False)
    mp = mct_fx.summary(qmodel).mixed_precision
    assert mct_fx.resource_utilization(qmodel).activation_memory <= target.activation_memory
    sixteen = [node for node, bits in mp.bits.items() if "A16" in bits]
    assert sixteen and len(sixteen) < len([e for e in entries if e.activation])
    for node in sixteen:
        assert getattr(qmodel, f"{node}_act_quant").n_bits == 16
    with torch.no_grad():
        assert torch.isfinite(qmodel(calib[0])).all()


def test_a_sample_whose_float_value_is_zero_does_not_drown_the_distance(monkeypatch):
    """A layer whose float output is all zero for some images (a ReLU that is off for them, as a
    squeeze-excitation block's can be) while the quantized one is not: its per-image normalized error
    is floored at a share of the layer's mean energy instead of dividing by ~0 (which made the trained
    SSD's mixed precision rank 16-bit activations as 10^4 times worse than 8-bit ones)."""
    from mct_fx.mixed_precision import sensitivity

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)).eval()
    with torch.no_grad():
        model[0].bias.copy_(torch.linspace(0.11, 0.47, 8))
        model[0].weight[:, 0] = -model[0].bias  # x = e0: pre-activations exactly 0 in float, ReLU off
    x = torch.cat([torch.randn(28, 4), torch.eye(4)[:1].repeat(4, 1)])
    qmodel = mct_fx.quantize(model, [x], config=mct_fx.QuantConfig(weights_bias_correction=False), verbose=False)
    kernel = qmodel.get_submodule("_0_weight_quant")
    kernel.set_grid(kernel.scale * 16, kernel.zero_point)  # a coarse kernel grid: the ReLU turns on for e0
    evaluator = sensitivity.SensitivityEvaluator(qmodel, [((x,), {})])
    with torch.no_grad():
        relu = evaluator._run_all([x[-4:]])[evaluator.returned[evaluator.n_outputs]]
    assert relu.abs().sum() > 0  # quantized: on for e0; float: all zero
    floored = evaluator.measure()[0]
    monkeypatch.setattr(sensitivity, "NORM_FLOOR", 0.0)
    unfloored = sensitivity.SensitivityEvaluator(qmodel, [((x,), {})]).measure()[0]
    assert floored < 1 < 1e3 < unfloored
