"""IMX500 export: the MCTQ ONNX contract the converter checks, agreement with the GraphModule under the
reference kernels of ``mct-quantizers``, refusals before anything is written, and the converter wrapper."""

import copy
import json
import os
import shutil
import stat

import onnx
import pytest
import torch
import torchvision
from torch import nn

import mct_fx
from mct_fx import demo
from mct_fx.convert_imx500 import ConversionError, convert_imx500, find_converter, read_memory_report
from mct_fx.export import ExportError
from mct_fx.export_imx500 import MCTQ_DOMAIN, export_imx500, reference_session_options
from mct_fx.quantizers import ActivationQuantizer, LutWeightQuantizer, WeightQuantizer
from mct_fx.tpc import with_bits

import zoo

pytestmark = pytest.mark.skipif(reference_session_options() is None,
                                reason="needs mct-quantizers + onnxruntime-extensions (pip install 'mct-fx[imx500]')")

# ONNX ops imxconv-pt 3.19 parses (its ONNX parser's table)
CONVERTER_OPS = {
    "Abs", "Add", "ArgMax", "AveragePool", "Cast", "Clip", "Conv", "Concat", "ConvTranspose", "Cos", "Div",
    "Dropout", "Equal", "Exp", "Expand", "Flatten", "Gather", "GatherElements", "Gelu", "Gemm",
    "GlobalAveragePool", "GroupNormalization", "HardSigmoid", "HardSwish", "InstanceNormalization",
    "LayerNormalization", "LeakyRelu", "MatMul", "Max", "MaxPool", "Min", "Mul", "Neg", "Pad", "Pow", "ReduceL2",
    "ReduceMax", "ReduceMean", "ReduceSum", "Relu", "Reshape", "Resize", "Sigmoid", "Sin", "Slice", "Softmax",
    "Split", "Sqrt", "Squeeze", "Sub", "Unsqueeze", "Tanh", "TopK", "Transpose", "BatchNormalization", "Identity",
    "Constant",
}
# the attribute sets the converter validates exactly (a missing or an extra one is refused)
ATTRIBUTES = {
    "ActivationPOTQuantizer": {"threshold", "signed", "num_bits", "mctq_version"},
    "WeightsSymmetricQuantizer": {"num_bits", "per_channel", "channel_axis", "signed", "mctq_version"},
    "WeightsPOTQuantizer": {"num_bits", "per_channel", "channel_axis", "signed", "mctq_version"},
    "WeightsLUTSymmetricQuantizer": {"num_bits", "per_channel", "channel_axis", "signed", "mctq_version",
                                     "input_rank", "lut_values_bitwidth", "eps"},
    "WeightsLUTPOTQuantizer": {"num_bits", "per_channel", "channel_axis", "signed", "mctq_version",
                               "input_rank", "lut_values_bitwidth", "eps"},
}


@pytest.fixture(scope="module")
def trained():
    model = demo.load_model()
    calib, test, labels = demo.load_samples()
    return model, list(calib[:128].split(32)), test[:64]


def _frozen(qmodel, cls):
    return [m for m in qmodel.modules() if isinstance(m, cls) and m.mode == "frozen"]


def _attrs(node):
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def check_contract(path):
    """The file against what imxconv-pt checks; returns the loaded model."""
    model = onnx.load(str(path))
    onnx.checker.check_model(model, full_check=True)
    assert model.producer_name == "pytorch" and int(model.producer_version.split(".")[0]) >= 2
    assert model.ir_version <= 10
    opsets = {i.domain: i.version for i in model.opset_import}
    assert 15 <= opsets.get("", opsets.get("ai.onnx")) <= 20 and opsets[MCTQ_DOMAIN] == 1
    names = [n.name for n in model.graph.node]
    assert all(names) and len(set(names)) == len(names)
    typed = {v.name: v for v in (*model.graph.value_info, *model.graph.output)}
    for node in model.graph.node:
        assert node.domain in ("", MCTQ_DOMAIN), node.domain
        if node.domain == "":
            assert node.op_type in CONVERTER_OPS, node.op_type
            continue
        assert set(_attrs(node)) == ATTRIBUTES[node.op_type], node.name
        shape = typed[node.output[0]].type.tensor_type.shape.dim  # a value_info for every custom op's output
        assert shape and all(d.dim_value > 0 and not d.dim_param for d in shape), node.name
    for v in (*model.graph.input, *model.graph.output):
        dims = v.type.tensor_type.shape.dim
        assert dims[0].dim_value == 1 and all(d.dim_value > 0 and not d.dim_param for d in dims)  # static, batch 1
    return model


def _by_type(model):
    out = {}
    for n in model.graph.node:
        if n.domain == MCTQ_DOMAIN:
            out.setdefault(n.op_type, []).append(n)
    return out


def test_demo_file_meets_the_contract_and_agrees_exactly(trained, tmp_path):
    model, calib, test = trained
    qmodel = mct_fx.quantize(model, calib, "imx500", verbose=False)
    result = export_imx500(qmodel, test[:1], tmp_path / "demo.onnx")
    onnx_model = check_contract(result.path)
    ops = _by_type(onnx_model)
    acts, weights = _frozen(qmodel, ActivationQuantizer), _frozen(qmodel, WeightQuantizer)
    assert len(ops["ActivationPOTQuantizer"]) == len(acts) == result.quantizers["ActivationPOTQuantizer"]
    assert len(ops["WeightsSymmetricQuantizer"]) == len(weights)
    # thresholds: signed scale * 2^(n-1), unsigned scale * 2^n, as the reference kernels read them
    first = _attrs(ops["ActivationPOTQuantizer"][0])
    q = qmodel.input_1_act_quant
    assert first["signed"] == 0 and first["num_bits"] == 8
    assert first["threshold"] == pytest.approx(float(q.scale) * 256)
    assert result.agreement.within_one_step == 1.0 and result.agreement.max_abs_diff == 0.0


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2"])
def test_zoo_models_meet_the_contract(name, tmp_path):
    model, side = zoo.build(name)
    qmodel = mct_fx.quantize(model, zoo.calibration(side, n_batches=2), "imx500", verbose=False)
    result = export_imx500(qmodel, zoo.evaluation(side, 1), tmp_path / f"{name}.onnx")
    onnx_model = check_contract(result.path)
    assert not result.shifted
    assert result.quantizers["WeightsSymmetricQuantizer"] == len(_frozen(qmodel, WeightQuantizer))
    assert result.agreement.faithful
    if name == "mobilenet_v2":  # rescaled ReLU6 bounds leave as one Clip each, which the converter fuses
        assert not any(n.op_type == "Min" for n in onnx_model.graph.node)


def test_shift_negative_becomes_an_add_before_an_unsigned_grid(tmp_path):
    """MobileNetV3's Hardswish outputs get shifted unsigned grids: add + unsigned quantizer, the shift
    folded into the next layers' biases and paddings, a 16-bit grid before the add."""
    torch.manual_seed(0)
    model = torchvision.models.mobilenet_v3_small(weights=None)
    zoo.reestimate_bn(model, 64)
    qmodel = mct_fx.quantize(model.eval(), zoo.calibration(64, n_batches=2), "imx500", verbose=False)
    shifted = [m for m in _frozen(qmodel, ActivationQuantizer) if float(m.zero_point) != 0]
    assert shifted, "expected shift-negative grids on Hardswish outputs"
    result = export_imx500(qmodel, zoo.evaluation(64, 1), tmp_path / "mnv3.onnx")
    assert len(result.shifted) == len(shifted)
    onnx_model = check_contract(result.path)
    producers = {o: n for n in onnx_model.graph.node for o in n.output}
    consts = {n.output[0]: onnx.numpy_helper.to_array(n.attribute[0].t) for n in onnx_model.graph.node
              if n.op_type == "Constant"}
    consts.update({t.name: onnx.numpy_helper.to_array(t) for t in onnx_model.graph.initializer})
    unsigned_after_add = 0
    for node in _by_type(onnx_model)["ActivationPOTQuantizer"]:
        before = producers.get(node.input[0])
        if before is not None and before.op_type == "Add" and _attrs(node)["signed"] == 0:
            wide = producers[before.input[0]]
            assert wide.op_type == "ActivationPOTQuantizer" and _attrs(wide)["num_bits"] == 16
            unsigned_after_add += 1
    assert unsigned_after_add == len(shifted)
    pads = [n for n in onnx_model.graph.node if n.op_type == "Pad"]
    assert pads and all(float(consts[p.input[2]]) > 0 for p in pads)  # padded with the shift, not zero
    assert result.agreement.faithful


def test_lut_kernels_export_as_lut_ops(trained, tmp_path):
    model, calib, test = trained
    qmodel = mct_fx.quantize(model, calib, with_bits(mct_fx.get_tpc("imx500_lut"), weights=4), verbose=False)
    result = export_imx500(qmodel, test[:1], tmp_path / "lut.onnx")
    onnx_model = check_contract(result.path)
    luts = _by_type(onnx_model)["WeightsLUTPOTQuantizer"]
    assert len(luts) == len(_frozen(qmodel, LutWeightQuantizer))
    consts = {n.output[0]: onnx.numpy_helper.to_array(n.attribute[0].t) for n in onnx_model.graph.node
              if n.op_type == "Constant"}
    table = consts[luts[0].input[1]]
    assert table.shape == (16,) and (table == table.round()).all() and abs(table).max() <= 128
    assert _attrs(luts[0])["num_bits"] == 4 and _attrs(luts[0])["lut_values_bitwidth"] == 8
    assert result.agreement.faithful


def test_mixed_precision_kernels_keep_their_bits(trained, tmp_path):
    model, calib, test = trained
    ru = mct_fx.resource_utilization(model, test[:1], "imx500")
    qmodel = mct_fx.quantize(model, calib, "imx500", target=mct_fx.ResourceUtilization(
        weights_memory=0.4 * ru.weights_memory), verbose=False)
    bits = {m.n_bits for m in _frozen(qmodel, WeightQuantizer)}
    assert bits & {2, 4}, bits
    result = export_imx500(qmodel, test[:1], tmp_path / "mp.onnx")
    onnx_model = check_contract(result.path)
    exported = sorted(_attrs(n)["num_bits"] for n in _by_type(onnx_model)["WeightsSymmetricQuantizer"])
    assert exported == sorted(m.n_bits for m in _frozen(qmodel, WeightQuantizer))
    assert result.agreement.faithful


class _Erf(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.head(torch.special.erf(self.conv(x)))


def _refused(qmodel, x, path, match):
    with pytest.raises(ExportError, match=match):
        export_imx500(qmodel, x, path)
    assert not path.exists()  # nothing half-written


def test_what_the_format_cannot_express_fails_before_writing(trained, tmp_path):
    model, calib, test = trained
    imx = mct_fx.quantize(model, calib, "imx500", verbose=False)
    _refused(imx, test[:2], tmp_path / "b2.onnx", "static batch of 1, got shape \\(2, 1, 28, 28\\)")
    _refused(mct_fx.quantize(model, calib, "int8", verbose=False), test[:1], tmp_path / "int8.onnx",
             "input_1_act_quant.*uniform activation grid")
    act16 = mct_fx.quantize(model, calib, "imx500_16bit", mct_fx.QuantConfig(
        overrides=(mct_fx.LayerOverride(name="relu1", activation_n_bits=16),)), verbose=False)
    _refused(act16, test[:1], tmp_path / "a16.onnx", "relu1_act_quant.*16-bit activation feeds convolution 'conv2'")
    erf = mct_fx.quantize(_Erf().eval(), [torch.randn(4, 3, 16, 16) for _ in range(2)], "imx500", verbose=False)
    _refused(erf, torch.randn(1, 3, 16, 16), tmp_path / "erf.onnx",
             "node 'special_erf' \\(unknown op\\).*not quantized")
    off = copy.deepcopy(imx)
    off.relu2_act_quant.set_mode("off")
    _refused(off, test[:1], tmp_path / "off.onnx", "relu2_act_quant.*is off")


def test_export_leaves_the_model_untouched(trained, tmp_path):
    model, calib, test = trained
    qmodel = mct_fx.quantize(model, calib, "imx500", verbose=False)
    before = {k: v.clone() for k, v in qmodel.state_dict().items() if torch.is_tensor(v)}
    code = qmodel.code
    export_imx500(qmodel, test[:1], tmp_path / "m.onnx")
    assert qmodel.code == code
    assert all(torch.equal(before[k], v) for k, v in qmodel.state_dict().items() if torch.is_tensor(v))


# ------------------------------------------------------------------ the converter wrapper


def _fake_converter(tmp_path, script: str):
    path = tmp_path / "imxconv-pt"
    path.write_text("#!/bin/sh\n" + script)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return path


def test_missing_converter_or_java_names_the_install(tmp_path, monkeypatch):
    onnx_file = tmp_path / "m.onnx"
    onnx_file.write_bytes(b"")
    with pytest.raises(ConversionError, match="pip install 'imx500-converter\\[pt\\]'"):
        find_converter(tmp_path / "no-such-imxconv-pt")
    fake = _fake_converter(tmp_path, "exit 0\n")
    monkeypatch.delenv("JAVA_HOME", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(ConversionError, match="apt-get install -y openjdk-17-jre-headless"):
        convert_imx500(onnx_file, tmp_path / "out", fake)


def test_the_converters_error_line_is_passed_through(tmp_path):
    onnx_file = tmp_path / "m.onnx"
    onnx_file.write_bytes(b"")
    fake = _fake_converter(tmp_path, (
        "echo '2026-12-02 16:50:06.879 INFO : CODE: [START] Starting SDSPconv'\n"
        "echo \"2026-12-02 16:50:06.879 ERROR: CODE: [ISM] ConvFe error (ISM) on 'm': Not enough memory, "
        "available: 8.00MB , required: 11.32MB \"\n"
        "echo '\tat sdsp.app.Main(Main.kt:1)' >&2\nexit 1\n"))
    if shutil.which("java") is None and not os.environ.get("JAVA_HOME"):
        pytest.skip("no java")
    with pytest.raises(ConversionError, match=r"\[ISM\] ConvFe error .*required: 11.32MB; full log: .*imxconv.log"):
        convert_imx500(onnx_file, tmp_path / "out", fake)
    assert "Not enough memory" in (tmp_path / "out" / "imxconv.log").read_text()


def test_memory_report_is_parsed(tmp_path):
    path = tmp_path / "m_MemoryReport.json"
    path.write_text(json.dumps({"Memory Report": {
        "Name": "m", "Runtime Memory Physical Size": "152576B", "Model Memory Physical Size": "3679744B",
        "Reserved Memory": "1024B", "Memory Usage": "3833344B", "Total Memory Available On Chip": "8388480B",
        "Memory Utilization": "46%", "Fit In Chip": True}}))
    report = read_memory_report(path)
    assert report.fits and report.used_bytes == 3833344 and report.available_bytes == 8388480
    assert report.share == pytest.approx(0.457, abs=1e-3)
    assert "3.66 MB of 8 MB (45.7%), fits" in str(report)


def _converter_or_skip():
    try:
        return find_converter()
    except ConversionError:
        if os.environ.get("CI"):  # CI builds the converter: every landing proves the demo reaches the chip
            raise
        pytest.skip("imxconv-pt not installed (nox -s converter builds .nox/imx500)")


@pytest.mark.slow
@pytest.mark.parametrize("name", ["mobilenet_v2", "efficientnet_b0", "regnet_y_400mf", "shufflenet_v2_x1_0",
                                  "mobilenet_v3_large", "resnet18"])
def test_zoo_models_through_the_real_converter(name, tmp_path):
    converter = _converter_or_skip()
    if name in zoo.SQNR_ZOO:
        model, side = zoo.build(name)
    else:
        torch.manual_seed(0)
        model, side = torchvision.models.get_model(name, weights=None), 64
        zoo.reestimate_bn(model, side)
    qmodel = mct_fx.quantize(model.eval(), zoo.calibration(side, n_batches=2), "imx500", verbose=False)
    exported = export_imx500(qmodel, zoo.evaluation(side, 1), tmp_path / f"{name}.onnx")
    if name == "resnet18":  # 11.7 M parameters at 8 bits do not fit the chip's 8 MB: the converter says so
        with pytest.raises(ConversionError, match="Not enough memory"):
            convert_imx500(exported.path, tmp_path / "imx500", converter)
        return
    package = convert_imx500(exported.path, tmp_path / "imx500", converter)
    assert package.memory.fits
