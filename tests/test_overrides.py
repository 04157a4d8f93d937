"""Manual per-node overrides: bit-widths among the target's candidates, scheme, error method."""

import math
from dataclasses import replace

import pytest
import torch
import torchvision

import mct_fx
from mct_fx import LayerOverride, QuantConfig, TPCError
from mct_fx.quantizers import QuantMethod
from mct_fx.tpc.schema import OperatorSet, QuantConfigOptions

import zoo


@pytest.fixture(scope="module")
def resnet():
    model = torchvision.models.resnet18(weights=None)
    zoo.reestimate_bn(model, 32)
    return model.eval()


@pytest.fixture(scope="module")
def data():
    return [zoo.images(4, 32, seed=s) for s in range(2)]


def _quantize(model, data, tpc, *overrides, **config):
    return mct_fx.quantize(model, data, tpc, QuantConfig(overrides=overrides, **config), verbose=False)


def _sqnr(model, qmodel, data):
    with torch.no_grad():
        ref = torch.cat([model(b) for b in data])
        out = torch.cat([qmodel(b) for b in data])
    return 10 * math.log10(ref.pow(2).mean() / (out - ref).pow(2).mean())


def test_16bit_activations_where_the_target_offers_them(resnet, data):
    base = _quantize(resnet, data, "imx500_16bit")
    wide = _quantize(resnet, data, "imx500_16bit", LayerOverride(name="layer*", activation_n_bits=16))
    bits = {n: m.n_bits for n, m in wide.named_modules() if isinstance(m, mct_fx.ActivationQuantizer)}
    assert bits["layer1_0_relu_act_quant"] == 16  # the relu fused after layer1.0.conv1
    assert bits["layer1_0_relu_1_act_quant"] == 16  # the relu fused after the first residual add
    assert bits["x_act_quant"] == 8 and bits["relu_act_quant"] == 8  # outside "layer*"
    assert wide.layer1_0_relu_act_quant.signed  # the target's 16-bit candidate is signed
    assert _sqnr(resnet, wide, data) > _sqnr(resnet, base, data) + 1.0
    rows = {r.node: r for r in mct_fx.summary(wide).layers}
    assert rows["layer1_0_relu"].activation.startswith("16b") and rows["relu"].activation.startswith("8b")


def test_weight_bits_by_op_and_by_module_path(resnet, data):
    q = _quantize(resnet, data, "imx500", LayerOverride(op="Conv", weights_n_bits=4),
                  LayerOverride(name="layer4.1.conv2", weights_n_bits=2))
    bits = {n: m.n_bits for n, m in q.named_modules() if isinstance(m, mct_fx.WeightQuantizer)}
    assert bits["conv1_weight_quant"] == 4 and bits["layer1_0_conv1_weight_quant"] == 4
    assert bits["layer4_1_conv2_weight_quant"] == 2  # the later override wins
    assert bits["fc_weight_quant"] == 8  # not a Conv
    assert _sqnr(resnet, q, data) < _sqnr(resnet, _quantize(resnet, data, "imx500"), data) - 3


def test_scheme_and_error_method_per_node(resnet, data):
    q = _quantize(resnet, data, "imx500", LayerOverride(name="fc", weights_error_method="noclipping"),
                  LayerOverride(name="x", activation_method="uniform"))
    w = resnet.fc.weight.detach()
    expected = w.abs().amax(1) / 128  # no clipping: the grid covers max |w| of each row
    assert torch.allclose(q.fc_weight_quant.scale, expected)
    plain = _quantize(resnet, data, "imx500")
    assert not torch.allclose(plain.fc_weight_quant.scale, expected)  # MSE clips somewhere
    assert q.x_act_quant.method is QuantMethod.UNIFORM and plain.x_act_quant.method is QuantMethod.POWER_OF_TWO


def test_bits_the_target_does_not_offer(resnet, data):
    with pytest.raises(TPCError, match=r"layer1_0_relu.*activation bits 16.*offers"):
        _quantize(resnet, data, "imx500", LayerOverride(name="layer1.0.conv1", activation_n_bits=16))
    with pytest.raises(TPCError, match="weight bits 3"):
        _quantize(resnet, data, "imx500", LayerOverride(op="Conv", weights_n_bits=3))


def test_override_that_selects_nothing(resnet, data):
    with pytest.raises(TPCError, match=r"LayerOverride\(name='layer9\*'\) selects no quantizable node"):
        _quantize(resnet, data, "imx500", LayerOverride(name="layer9*", weights_n_bits=4))


def test_consumer_that_cannot_read_16_bits(resnet, data):
    tpc = mct_fx.get_tpc("imx500_16bit")
    sets = []
    for s in tpc.operator_sets:
        if s.name == "FullyConnected":
            opts = s.options
            cands = tuple(replace(c, supported_input_activation_n_bits=(8,)) for c in opts.candidates)
            base = replace(opts.base, supported_input_activation_n_bits=(8,))
            s = OperatorSet(s.name, QuantConfigOptions(cands, base=base))
        sets.append(s)
    narrow = replace(tpc, name="fc8", operator_sets=tuple(sets))
    with pytest.raises(TPCError, match=r"'fc' \(FullyConnected\) takes 16-bit input from 'flatten'|'fc'.*16-bit"):
        _quantize(resnet, data, narrow, LayerOverride(op="AvgPool", activation_n_bits=16))


@pytest.mark.parametrize("kwargs,match", [
    ({}, "name= and/or op="),
    ({"name": "x", "activation_n_bits": 17}, "activation_n_bits"),
    ({"name": "x", "weights_error_method": "l3"}, "weights_error_method"),
    ({"op": "Conv", "activation_method": "log"}, "activation_method"),
])
def test_bad_overrides(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LayerOverride(**kwargs)
