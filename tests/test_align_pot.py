"""Power-of-two alignment (``passes/align_pot.py``): the float function is kept, each aligned tensor's
best threshold lands on a power of two, and the aligned layers get less error."""

import math
import statistics

import pytest
import torch

import mct_fx
from mct_fx.data import iter_batches
from mct_fx.passes.align_pot import ALIGNMENT_KEY, alignment_factors, apply_alignment
from mct_fx.passes.calibrate import calibrate
from mct_fx.passes.freeze import freeze_quantizers
from mct_fx.quantizers import QuantMethod, StreamingHistogram
from mct_fx.quantizers.clamp import BoundedReLU
from mct_fx.quantizers.modules import quantizers_off

import zoo

CONFIG = mct_fx.QuantConfig()
RESNET18_INNER_RELUS = {f"layer{stage}_{block}_relu_act_quant" for stage in range(1, 5) for block in (0, 1)}


def _calibrated(name: str, tpc: str = "imx500"):
    model, side = zoo.build(name, 0)
    calib = zoo.calibration(side, n_batches=4)
    gm = mct_fx.prepare(model, calib[0], tpc, CONFIG)
    calibrate(gm, iter_batches(calib), verbose=False)
    return model, gm, calib, zoo.evaluation(side)


def _float_outputs(gm, x):
    with torch.no_grad(), quantizers_off(gm):
        return gm(x)


def _threshold(gm, node_name: str) -> float:
    node = next(n for n in gm.graph.nodes if n.name == node_name)
    q = gm.get_submodule(node.target)
    return float(q.scale) * 2 ** (q.n_bits - int(q.signed))


def test_resnet18_inner_relus_are_aligned_and_the_float_function_kept():
    _, gm, _, x = _calibrated("resnet18")
    factors = alignment_factors(gm, CONFIG)
    # block outputs feed the residual adds: only the ReLUs inside the blocks qualify
    assert set(factors) == RESNET18_INNER_RELUS
    before = _float_outputs(gm, x)
    apply_alignment(gm, factors)
    after = _float_outputs(gm, x)
    assert torch.allclose(after, before, rtol=1e-4, atol=1e-4 * float(before.abs().max()))
    freeze_quantizers(gm, CONFIG)
    for name, factor in factors.items():
        threshold = _threshold(gm, name)
        assert math.log2(threshold).is_integer()
        assert 2 ** -0.5 <= factor <= 2 ** 0.5  # the nearest power of two: the smallest rescaling


def test_aligned_thresholds_are_the_unconstrained_best():
    """After rescaling, the symmetric (any-threshold) search on the tensor's histogram finds a power of two."""
    _, gm, _, _ = _calibrated("resnet18")
    factors = alignment_factors(gm, CONFIG)
    apply_alignment(gm, factors)
    again = alignment_factors(gm, CONFIG)
    assert not again, again  # every factor is now 1 (within the rewrite tolerance)


def test_aligned_layers_get_more_accurate():
    """Per-layer SQNR (mct_fx.compare, which replays the alignment on the float model) of the aligned
    layers rises; without the replay the aligned layers would read as garbage."""
    model, gm, calib, x = _calibrated("resnet18")
    on = mct_fx.quantize(model, calib, "imx500", verbose=False)
    off = mct_fx.quantize(model, calib, "imx500", mct_fx.QuantConfig(power_of_two_alignment=False), verbose=False)
    assert set(on.meta[ALIGNMENT_KEY]) == RESNET18_INNER_RELUS and ALIGNMENT_KEY not in off.meta
    sqnr = {}
    for label, q in (("on", on), ("off", off)):
        report = mct_fx.compare(model, q, [x])
        sqnr[label] = {layer.node: layer.metrics["sqnr"] for layer in report.layers}
    aligned = [name.removesuffix("_act_quant") for name in RESNET18_INNER_RELUS]
    gains = [sqnr["on"][n] - sqnr["off"][n] for n in aligned]
    assert min(gains) > -0.05 and statistics.mean(gains) > 0.15, gains
    with torch.no_grad():
        assert zoo.sqnr_db(model(x), on(x)) > zoo.sqnr_db(model(x), off(x))


def test_bounded_relus_scale_with_their_input_and_round_trip():
    """MobileNetV2: ReLU6 chains (bounded by relu_bound) align too; the bound is state, so a freshly
    prepared model that loads the state_dict computes the same."""
    model, gm, calib, x = _calibrated("mobilenet_v2")
    factors = alignment_factors(gm, CONFIG)
    sources = {n.name: n.args[0] for n in gm.graph.nodes if n.name in factors}
    bounded = [n for n, src in sources.items()
               if src.op == "call_module" and isinstance(gm.get_submodule(src.target), BoundedReLU)]
    assert len(bounded) >= 10, factors
    before = _float_outputs(gm, x)
    apply_alignment(gm, factors)
    assert torch.allclose(_float_outputs(gm, x), before, rtol=1e-4, atol=1e-4 * float(before.abs().max()))
    q = mct_fx.quantize(model, calib, "imx500", verbose=False)
    assert set(q.meta[ALIGNMENT_KEY]) == set(factors)
    fresh = mct_fx.prepare(model, calib[0], "imx500")
    fresh.load_state_dict(q.state_dict())
    with torch.no_grad():
        assert torch.equal(fresh(x), q(x))


def test_ineligible_tensors_are_left_alone():
    # no power-of-two activation grid: nothing to align
    _, gm, _, _ = _calibrated("resnet18", tpc="int8")
    assert alignment_factors(gm, CONFIG) == {}
    # a power-of-two kernel would not scale exactly: its layer's chain is skipped
    _, gm, _, _ = _calibrated("resnet18")
    gm.get_submodule("layer1_0_conv2_weight_quant").method = QuantMethod.POWER_OF_TWO
    assert set(alignment_factors(gm, CONFIG)) == RESNET18_INNER_RELUS - {"layer1_0_relu_act_quant"}
    with pytest.raises(ValueError, match="'layer1_0_relu_act_quant' is not a layer"):
        apply_alignment(gm, {"layer1_0_relu_act_quant": 0.9})


def test_histogram_scale_moves_the_bins_with_the_values():
    h = StreamingHistogram(bins_per_side=64)
    h.update(torch.linspace(-1.0, 3.0, 101))
    centres, counts = h.centres_and_counts()
    h.shift(0.5)
    h.scale(0.25)
    scaled, same = h.centres_and_counts()
    assert torch.equal(same, counts)
    assert torch.allclose(scaled, (centres + 0.5) * 0.25)
    assert float(h.min) == pytest.approx(-0.125) and float(h.max) == pytest.approx(0.875)
    with pytest.raises(RuntimeError, match="cannot take more data"):
        h.update(torch.ones(3))
    with pytest.raises(ValueError, match="> 0"):
        h.scale(0.0)


def test_bounded_relu_is_a_clamp_with_its_bound_in_the_state():
    m = BoundedReLU(6.0)
    x = torch.linspace(-2.0, 8.0, 11)
    assert torch.equal(m(x), torch.nn.functional.relu6(x))
    assert list(m.state_dict()) == ["bound"] and m.max_val == 6.0
    with pytest.raises(ValueError, match="bound must be > 0"):
        BoundedReLU(0.0)
