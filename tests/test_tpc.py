"""TPC schema, JSON round trip with field-naming errors, built-ins, derived targets, matching."""

import json
from dataclasses import replace

import pytest
import torch
from torch import nn

import mct_fx
from mct_fx.tpc import (
    BUILTIN_TPCS,
    Fusing,
    OperatorSet,
    OpQuantConfig,
    QuantConfigOptions,
    TargetPlatformCapabilities,
    TPCError,
    get_tpc,
    load_tpc,
    save_tpc,
    tpc_from_dict,
    tpc_to_dict,
    with_bits,
)
from mct_fx.tpc.matching import annotate, annotation


@pytest.mark.parametrize("name", sorted(BUILTIN_TPCS))
def test_builtin_json_round_trip(name, tmp_path):
    tpc = get_tpc(name)
    path = tmp_path / f"{name}.json"
    save_tpc(tpc, path)
    assert load_tpc(path) == tpc
    assert get_tpc(str(path)) == tpc


def test_imx500_contents():
    tpc = get_tpc("imx500")
    conv = tpc.options_for("Conv")
    assert [c.kernel.n_bits for c in conv.candidates] == [8, 4, 2]
    assert conv.base.kernel.method.value == "symmetric" and conv.base.kernel.per_channel
    assert conv.base.activation_method.value == "power_of_two" and conv.base.simd_size == 32
    assert not tpc.options_for("Reshape").base.enable_activation_quantization
    assert not tpc.options_for("Conv").base.bias.enabled
    assert get_tpc("int8").options_for("ReLU").base.activation_method.value == "uniform"
    sixteen = get_tpc("imx500_16bit")
    assert 16 in {c.activation_n_bits for c in sixteen.options_for("Conv").candidates}
    assert sixteen.options_for("Reshape").base.quantization_preserving


def _bad(mutate):
    data = tpc_to_dict(get_tpc("imx500"))
    mutate(data)
    with pytest.raises(TPCError) as e:
        tpc_from_dict(json.loads(json.dumps(data)))
    return str(e.value)


def test_bad_json_names_the_field():
    msg = _bad(lambda d: d["operator_sets"][3]["options"]["candidates"][0].__setitem__("activation_n_bits", "eight"))
    assert "tpc.operator_sets[3].options.candidates[0].activation_n_bits" in msg
    msg = _bad(lambda d: d["default_options"]["candidates"][0].__setitem__("activation_method", "cubic"))
    assert "activation_method" in msg and "power_of_two" in msg
    msg = _bad(lambda d: d["operator_sets"][0].__setitem__("colour", 3))
    assert "tpc.operator_sets[0].colour: unknown field" in msg
    msg = _bad(lambda d: d["fusing_patterns"][0]["groups"][1].append("NoSuchOp"))
    assert "fusing_patterns[0].groups[1]" in msg and "NoSuchOp" in msg
    msg = _bad(lambda d: d["default_options"]["candidates"][0]["kernel"].__setitem__("n_bits", 40))
    assert "kernel.n_bits" in msg


def test_invalid_json_file(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text("{not json")
    with pytest.raises(TPCError, match="not valid JSON"):
        get_tpc(str(path))
    with pytest.raises(TPCError, match="does not exist"):
        get_tpc(str(tmp_path / "missing.json"))
    with pytest.raises(TPCError, match="unknown TPC 'imx9000'"):
        get_tpc("imx9000")


def test_schema_validation():
    a, b = OpQuantConfig(), OpQuantConfig(activation_n_bits=4)
    with pytest.raises(TPCError, match="base: required"):
        QuantConfigOptions((a, b))
    with pytest.raises(TPCError, match="base: must be one of"):
        QuantConfigOptions((a,), base=b)
    with pytest.raises(TPCError, match="duplicate operator set 'ReLU'"):
        TargetPlatformCapabilities("t", QuantConfigOptions((a,)), (OperatorSet("ReLU"), OperatorSet("ReLU")))
    with pytest.raises(TPCError, match="at least two positions"):
        Fusing((("Conv",),))
    with pytest.raises(TPCError, match="preserving op cannot also quantize"):
        OpQuantConfig(quantization_preserving=True)


def test_with_bits():
    w4 = with_bits(get_tpc("imx500"), weights=4)
    assert w4.options_for("Conv").base.kernel.n_bits == 4
    assert w4.options_for("Conv").base.activation_n_bits == 8
    a16 = with_bits(get_tpc("imx500_16bit"), activations=16)
    assert a16.options_for("Add").base.activation_n_bits == 16
    with pytest.raises(TPCError, match="operator set 'Conv': no candidate"):
        with_bits(get_tpc("imx500"), weights=3)


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 4, 1)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        y = torch.relu(self.conv(x))
        z = self.conv2(y) + y  # conv2 has one user (add), add has one user (relu)
        z = nn.functional.relu(z)
        z = torch.special.erf(z)  # not in the vocabulary
        return self.fc(z.mean((2, 3)).flatten(1))


def test_matching_fuses_and_lists_unknown_ops():
    gm = mct_fx.trace(_Block(), ((torch.randn(2, 3, 8, 8),), {}))
    unknown = annotate(gm, get_tpc("imx500"))
    ann = {n.name: annotation(n) for n in gm.graph.nodes if annotation(n) is not None}
    assert ann["conv"].fused_into == "relu" and not ann["conv"].quantize_output
    assert ann["relu"].quantize_output
    assert ann["add"].fused_into == "relu_1"
    assert ann["conv2"].quantize_output  # Conv -> Add is not a fusing pattern of imx500
    assert [n.name for n in unknown] == ["special_erf"]
    assert not ann["special_erf"].quantize_output and ann["special_erf"].op is None
    assert not ann["flatten"].quantize_output  # shape op: not quantized
    assert ann["x"].quantize_output  # model inputs are quantized


def test_custom_tpc_object_is_used_as_is():
    tpc = get_tpc("imx500")
    custom = replace(tpc, name="mine")
    assert get_tpc(custom) is custom
