"""QDQ ONNX export: standard ops only, runs in onnxruntime, agrees with the GraphModule."""

import collections
import copy

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

import mct_fx
from mct_fx.export import ExportError, export_onnx
from mct_fx.kernels import decompositions, fake_quant_lut
from mct_fx.quantizers import ActivationQuantizer, WeightQuantizer
from mct_fx.tpc import with_bits

import zoo

STANDARD_DOMAIN = ("", "ai.onnx")


def _quantized(name: str, tpc="imx500", side: int = 64):
    model, _ = zoo.build(name)
    return mct_fx.quantize(model, zoo.calibration(side, n_batches=2), tpc, verbose=False), zoo.evaluation(side, 8)


@pytest.fixture(scope="module")
def resnet18():
    return _quantized("resnet18")


def _frozen(qmodel, cls):
    return [m for m in qmodel.modules() if isinstance(m, cls) and m.mode == "frozen"]


def _ops(path):
    return collections.Counter(n.op_type for n in onnx.load(str(path)).graph.node)


def _run(path, x):
    """onnxruntime with graph optimizations off: the ONNX meaning of the file (fused int8
    kernels on x86 CPUs without VNNI may saturate, which is not the file's doing)."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2"])
def test_zoo_model_exports_as_standard_qdq(name, resnet18, tmp_path):
    qmodel, x = resnet18 if name == "resnet18" else _quantized(name)
    result = export_onnx(qmodel, x, tmp_path / "m.onnx")
    model = onnx.load(str(result.path))
    assert {n.domain for n in model.graph.node} <= set(STANDARD_DOMAIN)  # no custom ops
    acts, weights = _frozen(qmodel, ActivationQuantizer), _frozen(qmodel, WeightQuantizer)
    ops = _ops(result.path)
    assert ops["QuantizeLinear"] == len(acts) == result.n_quantize
    assert ops["DequantizeLinear"] == len(acts) + len(weights) == result.n_dequantize
    # weights are stored as int8 codes: as many int8 initializers as weight quantizers
    int8 = [t for t in model.graph.initializer if t.data_type == onnx.TensorProto.INT8]
    assert len(int8) == len(weights)
    a = result.agreement
    # Random-weight nets amplify the rare rounding-boundary flips (float sums in another
    # order) into many one-to-few-step differences at the output, but the file is exactly
    # as accurate as the GraphModule (test_first_quantizers_agree_exactly pins the codes).
    assert a.faithful and a.output_step is not None
    assert abs(a.sqnr_onnx_db - a.sqnr_graph_module_db) < 0.3
    # the batch dimension is dynamic
    x3 = zoo.evaluation(64, 3)
    with torch.no_grad():
        got, want = _run(result.path, x3), qmodel(x3).numpy()
    assert got.shape == want.shape == (3, 1000)
    # the file differs from the GraphModule less than quantization differs from float
    assert zoo.sqnr_db(torch.from_numpy(want), torch.from_numpy(got)) > a.sqnr_graph_module_db


def test_first_quantizers_agree_exactly(resnet18, tmp_path):
    """Before any flip can cascade, the file's codes equal the GraphModule's."""
    qmodel, x = resnet18
    path = export_onnx(qmodel, x, tmp_path / "m.onnx").path
    model = onnx.load(str(path))
    first_dq = [n for n in model.graph.node if n.op_type == "DequantizeLinear"
                and any(p.op_type == "QuantizeLinear" and p.output[0] == n.input[0] for p in model.graph.node)][:2]
    for n in first_dq:
        model.graph.output.append(onnx.helper.make_tensor_value_info(n.output[0], onnx.TensorProto.FLOAT, None))
    path.write_bytes(model.SerializeToString())
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    got = ort.InferenceSession(str(path), options).run(None, {"input": x.numpy()})[1:]
    seen = []
    hooks = [q.register_forward_hook(lambda m, i, o: seen.append(o)) for q in _frozen(qmodel, ActivationQuantizer)]
    with torch.no_grad():
        qmodel(x)
    for h in hooks:
        h.remove()
    np.testing.assert_array_equal(got[0], seen[0].numpy())  # the input quantizer: bit exact
    assert np.mean(got[1] == seen[1].numpy()) > 0.9999  # after the first conv: a handful of flips at most


def test_16bit_activations_export_with_int16_qdq(tmp_path):
    tpc = with_bits(mct_fx.get_tpc("imx500_16bit"), activations=16)
    qmodel, x = _quantized("resnet18", tpc)
    assert all(q.n_bits == 16 for q in _frozen(qmodel, ActivationQuantizer))
    result = export_onnx(qmodel, x, tmp_path / "m16.onnx")
    assert result.opset == 21
    model = onnx.load(str(result.path))
    zp_types = {n.attribute[0].t.data_type for n in model.graph.node if n.op_type == "Constant"
                and n.attribute[0].t.data_type not in (onnx.TensorProto.FLOAT,)}
    assert onnx.TensorProto.INT16 in zp_types
    assert result.agreement.faithful
    with pytest.raises(ExportError, match="opset 21"):
        export_onnx(qmodel, x, tmp_path / "m16_old.onnx", opset=19)


def test_narrow_grids_are_clipped(tmp_path):
    """4-bit activations live on int8 codes behind a Clip to the grid's real range."""
    qmodel, x = _quantized("resnet18", with_bits(mct_fx.get_tpc("imx500"), weights=4))
    for q in _frozen(qmodel, ActivationQuantizer):  # no built-in target has 4-bit activations: regrid them
        q.n_bits = 4
        q.set_grid(q.scale * 16, q.zero_point)
    result = export_onnx(qmodel, x, tmp_path / "m4.onnx")
    assert _ops(result.path)["Clip"] >= len(_frozen(qmodel, ActivationQuantizer))
    assert result.agreement.faithful


class _LutWeights(WeightQuantizer):
    """A look-up-table weight quantizer (no QDQ form)."""

    affine = False

    def forward(self, w):
        centers = torch.tensor([-1.0, -0.3, 0.0, 0.3, 1.0])
        return fake_quant_lut(w, centers, self.scale, self.axis)


def test_lut_weights_are_exported_dequantized_with_a_warning(resnet18, tmp_path):
    qmodel, x = copy.deepcopy(resnet18[0]), resnet18[1]
    old = qmodel.fc_weight_quant
    lut = _LutWeights("symmetric", 8, channels=old.scale.numel(), axis=0)
    lut.load_state_dict(old.state_dict())
    qmodel.fc_weight_quant = lut
    with pytest.warns(UserWarning, match="fc_weight_quant.*dequantized"):
        result = export_onnx(qmodel, x, tmp_path / "lut.onnx")
    assert result.agreement.faithful
    assert result.n_dequantize == len(_frozen(qmodel, ActivationQuantizer)) + len(
        _frozen(qmodel, WeightQuantizer)) - 1


def test_export_rejects_bad_input(resnet18, tmp_path):
    model, _ = zoo.build("resnet18")
    prepared = mct_fx.prepare(model, zoo.evaluation(64, 2))
    with pytest.raises(ExportError, match="x_act_quant.*not calibrated"):
        export_onnx(prepared, zoo.evaluation(64, 2), tmp_path / "p.onnx")
    with pytest.raises(ExportError, match="GraphModule"):
        export_onnx(model, zoo.evaluation(64, 2), tmp_path / "p.onnx")
    qmodel, x = resnet18
    with pytest.raises(ExportError, match="opset must be in 13..21"):
        export_onnx(qmodel, x, tmp_path / "p.onnx", opset=11)


def test_export_leaves_the_model_untouched(resnet18, tmp_path):
    qmodel, x = resnet18
    before = {k: v.clone() for k, v in qmodel.state_dict().items() if isinstance(v, torch.Tensor)}
    code = qmodel.code
    export_onnx(qmodel, x, tmp_path / "m.onnx")
    assert qmodel.code == code
    after = qmodel.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in before.items())


def test_torch_export_of_quantized_model():
    qmodel, x = _quantized("mobilenet_v2")
    batch = torch.export.Dim("batch", min=1, max=64)
    program = torch.export.export(qmodel, (x,), dynamic_shapes=({0: batch},))
    targets = {n.target for n in program.graph.nodes if n.op == "call_function"}
    assert torch.ops.mct_fx.fake_quant.default in targets  # one real op per quantizer
    x5 = zoo.evaluation(64, 5)
    with torch.no_grad():
        torch.testing.assert_close(program.module()(x5), qmodel(x5), rtol=0, atol=0)
    # lowered to plain aten ops (no mct_fx op left), same numbers
    lowered = program.run_decompositions(decompositions())
    targets = {str(n.target) for n in lowered.graph.nodes if n.op == "call_function"}
    assert not any(t.startswith("mct_fx.") for t in targets) and "aten.round.default" in targets
    with torch.no_grad():
        torch.testing.assert_close(lowered.module()(x5), qmodel(x5), rtol=0, atol=0)


def test_small_model_matches_within_one_step(tmp_path):
    """A shallow model has no room for flip cascades: every output within one step."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 14 * 14, 5))
    model.eval()
    x = torch.rand(16, 3, 16, 16)
    qmodel = mct_fx.quantize(model, [x], "int8", verbose=False)
    a = export_onnx(qmodel, x, tmp_path / "s.onnx", dynamic_batch=False).agreement
    assert a.within_one_step == 1.0 and a.max_abs_diff <= a.output_step * (1 + 1e-6)
