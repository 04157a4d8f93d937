"""Detectors that end in Sony's NMS (``edgemdt_cl``): traced as one call, left float with quantized inputs,
exported to the IMX500 format with the NMS op the converter takes, measured at the NMS's inputs."""

from __future__ import annotations

import logging
import warnings

import onnx
import pytest
import torch
from torch import fx, nn

import mct_fx
from mct_fx.export_check import EDGEMDT_DOMAIN, edgemdt_session_options, graph_outputs, run_onnxruntime
from mct_fx.export_imx500 import reference_session_options
from mct_fx.hessian import HessianService
from mct_fx.meta import Role, quantized_node, quantizer_module
from mct_fx.passes.box_precision import box_nodes
from mct_fx.prepare import float_reference
from mct_fx.quantizers import ActivationQuantizer
from mct_fx.tpc.matching import annotation, measured_outputs

edgemdt = pytest.importorskip("edgemdt_cl.pytorch", reason="needs edge-mdt-cl (pip install 'mct-fx[imx500]')")
from edgemdt_cl.pytorch import FasterRCNNBoxDecode, MulticlassNMS, multiclass_nms  # noqa: E402

GRID, CLASSES, SIZE = 8, 3, 64


class TinyDetector(nn.Module):
    """Anchor-free: per cell of an 8x8 grid, four distances to the box sides (in pixels) and class scores;
    decoded to corner boxes and passed to the NMS, as a deployed model does."""

    def __init__(self, as_module: bool = False, iou: float = 0.6):
        super().__init__()
        self.iou = iou

        def block(i, o):
            return nn.Sequential(nn.Conv2d(i, o, 3, 2, 1), nn.BatchNorm2d(o), nn.SiLU())

        self.body = nn.Sequential(block(3, 16), block(16, 32), block(32, 32))
        self.box = nn.Conv2d(32, 4, 1)
        self.cls = nn.Conv2d(32, CLASSES, 1)
        ys, xs = torch.meshgrid(torch.arange(GRID) + 0.5, torch.arange(GRID) + 0.5, indexing="ij")
        self.register_buffer("centres", torch.stack([xs, ys], -1).reshape(1, GRID * GRID, 2) * (SIZE / GRID))
        self.nms = MulticlassNMS(score_threshold=0.05, iou_threshold=iou, max_detections=20) if as_module else None

    def forward(self, x):
        f = self.body(x)
        d = torch.relu(self.box(f)).flatten(2).transpose(1, 2) * (SIZE / GRID)
        boxes = torch.cat([self.centres - d[..., :2], self.centres + d[..., 2:]], -1)
        scores = torch.sigmoid(self.cls(f)).flatten(2).transpose(1, 2)
        if self.nms is not None:
            return self.nms(boxes, scores)
        res = multiclass_nms(boxes, scores, score_threshold=0.05, iou_threshold=self.iou, max_detections=20)
        return res.boxes, res.scores, res.labels, res.n_valid


class TinySsd(nn.Module):
    """SSD-style: one default box per cell, codes decoded by Sony's ``FasterRCNNBoxDecode`` (y-x order),
    softmax scores without the background column."""

    def __init__(self):
        super().__init__()

        def block(i, o):
            return nn.Sequential(nn.Conv2d(i, o, 3, 2, 1), nn.BatchNorm2d(o), nn.Hardswish())

        self.body = nn.Sequential(block(3, 16), block(16, 32), block(32, 32))
        self.box, self.cls = nn.Conv2d(32, 4, 1), nn.Conv2d(32, CLASSES + 1, 1)
        ys, xs = torch.meshgrid(torch.arange(GRID) + 0.5, torch.arange(GRID) + 0.5, indexing="ij")
        centres, half = torch.stack([ys.flatten(), xs.flatten()], 1) * (SIZE / GRID), SIZE / GRID
        self.decode = FasterRCNNBoxDecode(torch.cat([centres - half, centres + half], 1), (10, 10, 5, 5),
                                          (0, 0, SIZE, SIZE))

    def forward(self, x):
        f = self.body(x)
        boxes = self.decode(self.box(f).flatten(2).transpose(1, 2))
        scores = self.cls(f).flatten(2).transpose(1, 2).softmax(-1)[..., 1:]
        res = multiclass_nms(boxes, scores, score_threshold=0.05, iou_threshold=0.5, max_detections=20)
        return res.boxes, res.scores, res.labels, res.n_valid


def _detector(as_module: bool = False, iou: float = 0.6) -> nn.Module:
    torch.manual_seed(0)
    model = TinyDetector(as_module, iou)
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model.body(torch.rand(8, 3, SIZE, SIZE))
    return model.eval()


DATA = [torch.rand(4, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(i)) for i in range(4)]


def _nms_nodes(gm: fx.GraphModule) -> list[fx.Node]:
    return [n for n in gm.graph.nodes if annotation(n) is not None and annotation(n).op == "MulticlassNMS"]


def _quantized(gm: fx.GraphModule, node: fx.Node) -> bool:
    """``node``'s value is an activation quantizer's output (directly or through data-movement ops)."""
    while node.op != "call_module" or not isinstance(gm.get_submodule(node.target), ActivationQuantizer):
        ann = annotation(node)
        if ann is None or ann.config is None or ann.config.enable_activation_quantization or not node.args:
            return False
        node = node.args[0]
    return True


@pytest.mark.parametrize("as_module", [False, True], ids=["function", "module"])
def test_nms_is_one_float_call_with_quantized_inputs(as_module):
    qmodel = mct_fx.quantize(_detector(as_module), DATA, "imx500", verbose=False)
    (nms,) = _nms_nodes(qmodel)
    assert nms.op == ("call_module" if as_module else "call_function")
    boxes, scores = nms.args[:2]
    assert _quantized(qmodel, boxes) and _quantized(qmodel, scores)
    after = [u for n in nms.users for u in (n, *n.users)]
    assert not any(u.op == "call_module" and isinstance(qmodel.get_submodule(u.target), ActivationQuantizer)
                   for u in after)
    with torch.no_grad():  # the NMS still runs: the quantized model returns detections
        out = qmodel(DATA[0])
    assert out[0].shape == (4, 20, 4) and out[2].dtype == torch.int64


@pytest.mark.skipif(reference_session_options() is None, reason="needs mct-quantizers + onnxruntime-extensions")
@pytest.mark.parametrize("as_module", [False, True], ids=["function", "module"])
def test_imx500_file_has_the_nms_op_and_runs_as_the_graph_module(as_module, tmp_path):
    qmodel = mct_fx.quantize(_detector(as_module), DATA, "imx500", verbose=False)
    x = DATA[1][:1]
    result = mct_fx.export_imx500(qmodel, x, tmp_path / "det.onnx")
    model = onnx.load(str(result.path))
    (nms,) = [n for n in model.graph.node if n.domain == EDGEMDT_DOMAIN]
    assert nms.op_type == "MultiClassNMS" and nms.name
    assert {a.name: onnx.helper.get_attribute_value(a) for a in nms.attribute} == pytest.approx(
        {"score_threshold": 0.05, "iou_threshold": 0.6, "max_detections": 20})
    assert {(o.domain, o.version) for o in model.opset_import} >= {(EDGEMDT_DOMAIN, 1), ("mct_quantizers", 1)}
    got = run_onnxruntime(result.path, (x,), reference_session_options())
    expected = graph_outputs(qmodel, (x,))
    assert len(got) == len(expected) == 4
    for g, e in zip(got, expected, strict=True):
        assert torch.equal(g, e)
    assert result.agreement is not None and result.agreement.max_abs_diff == 0


@pytest.mark.skipif(reference_session_options() is None, reason="needs mct-quantizers + onnxruntime-extensions")
def test_box_decoding_is_one_float_call_exported_as_sonys_op(tmp_path):
    torch.manual_seed(0)
    model = TinySsd().eval()
    qmodel = mct_fx.quantize(model, DATA, "imx500", verbose=False)
    (decode,) = [n for n in qmodel.graph.nodes if annotation(n) is not None and annotation(n).op == "BoxDecode"]
    assert decode.op == "call_module" and _quantized(qmodel, decode.args[0])
    assert not any(u.op == "call_module" and isinstance(qmodel.get_submodule(u.target), ActivationQuantizer)
                   for u in decode.users)
    x = DATA[2][:1]
    result = mct_fx.export_imx500(qmodel, x, tmp_path / "ssd.onnx")
    ops = [n.op_type for n in onnx.load(str(result.path)).graph.node if n.domain == EDGEMDT_DOMAIN]
    assert ops == ["FasterRCNNBoxDecode", "MultiClassNMS"]
    for got, expected in zip(run_onnxruntime(result.path, (x,), reference_session_options()),
                             graph_outputs(qmodel, (x,)), strict=True):
        assert torch.equal(got, expected)


def _activation_bits(gm: fx.GraphModule, nodes) -> dict[str, int]:
    return {n.name: quantizer_module(gm, n.name, Role.ACTIVATION).n_bits for n in nodes}


def test_box_coordinates_get_the_widest_activations_the_target_offers(caplog):
    model = _detector()
    qmodel = mct_fx.quantize(model, DATA, "imx500_16bit", verbose=False)
    boxes = box_nodes(qmodel)
    assert [n.name for n in boxes] == ["mul", "sub", "add", "cat"]  # d * stride, centre -/+ d, the corners
    assert set(_activation_bits(qmodel, boxes).values()) == {16}
    (nms,) = _nms_nodes(qmodel)
    scores = [n for n in qmodel.graph.nodes if n.name == "sigmoid"]
    assert _activation_bits(qmodel, scores) == {"sigmoid": 8}  # the scores and the network stay 8-bit
    convs = [n for n in qmodel.graph.nodes if quantizer_module(qmodel, n.name, Role.ACTIVATION) is not None
             and n not in boxes and n.name != "sigmoid"]
    assert convs and set(_activation_bits(qmodel, convs).values()) == {8}
    # the user's override wins
    pinned = mct_fx.QuantConfig(overrides=(mct_fx.LayerOverride(name="cat", activation_n_bits=8),))
    qmodel8 = mct_fx.quantize(model, DATA, "imx500_16bit", pinned, verbose=False)
    assert _activation_bits(qmodel8, box_nodes(qmodel8))["cat"] == 8
    # a target without 16-bit candidates: a warning names the nodes and the target to use
    with caplog.at_level(logging.WARNING, logger="mct_fx"):
        mct_fx.quantize(model, DATA, "imx500", verbose=False)
    assert "nodes mul, sub, add, cat" in caplog.text and "imx500_16bit" in caplog.text
    torch.manual_seed(0)
    assert box_nodes(mct_fx.quantize(TinySsd().eval(), DATA, "imx500_16bit", verbose=False)) == []


@pytest.mark.skipif(reference_session_options() is None, reason="needs mct-quantizers + onnxruntime-extensions")
def test_16_bit_boxes_export_and_run_as_the_graph_module(tmp_path):
    qmodel = mct_fx.quantize(_detector(), DATA, "imx500_16bit", verbose=False)
    x = DATA[3][:1]
    result = mct_fx.export_imx500(qmodel, x, tmp_path / "det16.onnx")
    bits = {onnx.helper.get_attribute_value(a) for n in onnx.load(str(result.path)).graph.node
            if n.op_type == "ActivationPOTQuantizer" for a in n.attribute if a.name == "num_bits"}
    assert bits == {8, 16}
    for got, expected in zip(run_onnxruntime(result.path, (x,), reference_session_options()),
                             graph_outputs(qmodel, (x,)), strict=True):
        assert torch.equal(got, expected)


def test_distances_are_measured_on_boxes_and_scores():
    model = _detector()
    qmodel = mct_fx.quantize(model, DATA, "imx500", verbose=False)
    measured = measured_outputs(qmodel)
    assert measured == list(_nms_nodes(qmodel)[0].args[:2])  # the NMS's boxes and scores
    assert quantized_node(measured[0]) == "cat" and annotation(measured[1]).op == "Transpose"
    table = mct_fx.compare(model, qmodel, DATA[:2])
    assert table.reference.startswith("float model (prepared again")
    assert 5 < table.output["sqnr"] < 80 and table.output["cosine"] > 0.9


def test_an_ssd_is_measured_and_differentiated_at_its_box_codes():
    """Sony's box decode has no gradient: differentiating through it would give the box layers a zero
    Hessian (with only a warning); the codes it reads are measured instead."""
    torch.manual_seed(0)
    qmodel = mct_fx.quantize(TinySsd().eval(), DATA, "imx500", verbose=False)
    (decode,) = [n for n in qmodel.graph.nodes if annotation(n) is not None and annotation(n).op == "BoxDecode"]
    measured = measured_outputs(qmodel)
    assert measured[0] is decode.args[0] and annotation(measured[1]).op == "GetItem"
    (box,) = [n for n in qmodel.graph.nodes if n.op == "call_function" and n.name.startswith("box")]
    reference = float_reference(TinySsd().eval(), DATA[0], qmodel)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # torch's "autograd kernel was not registered"
        hessian = HessianService(reference, DATA[:1]).activations([box])
    assert hessian[box.name].min() > 0


def test_mixed_precision_and_gptq_take_a_detector():
    model = _detector()
    full = mct_fx.resource_utilization(model, DATA[0], "imx500")
    target = mct_fx.ResourceUtilization(weights_memory=full.weights_memory * 0.6)
    mixed = mct_fx.quantize(model, DATA, "imx500", target=target, verbose=False)
    summary = mct_fx.summary(mixed)
    assert summary.mixed_precision is not None
    assert mct_fx.resource_utilization(mixed).weights_memory <= target.weights_memory
    trained = mct_fx.gptq(model, DATA, "imx500", mct_fx.GPTQConfig(epochs=1), verbose=False)
    (nms,) = _nms_nodes(trained)
    assert _quantized(trained, nms.args[0])


@pytest.mark.parametrize("as_module", [False, True], ids=["function", "module"])
def test_a_bad_nms_setting_fails_early_naming_the_node(as_module):
    """Sony's own argument check runs while the example batch is traced, before calibration."""
    with pytest.raises(mct_fx.TraceError, match="at node '(multiclass_nms|nms)'.*iou_threshold 1.5"):
        mct_fx.quantize(_detector(as_module, iou=1.5), DATA, "imx500", verbose=False)


@pytest.mark.slow
def test_the_detector_reaches_the_chip_with_the_nms_on_it(tmp_path):
    from mct_fx.convert_imx500 import find_converter

    try:
        converter = find_converter()
    except mct_fx.ConversionError:
        pytest.skip("imxconv-pt not installed (nox -s converter builds .nox/imx500)")
    qmodel = mct_fx.quantize(_detector(), DATA, "imx500_16bit", verbose=False)  # 16-bit boxes into the NMS
    exported = mct_fx.export_imx500(qmodel, DATA[0][:1], tmp_path / "det.onnx")
    package = mct_fx.convert_imx500(exported.path, tmp_path / "imx500", converter)
    assert package.package.exists() and package.memory.fits


def _trained_detector(name: str):
    """The benchmark's trained detector (benchmarks/train_detection.py; trained and cached on first use, about
    15 min each), its first 300 test canvases, its mAP function and calibration canvases; skips without data."""
    pytest.importorskip("torchmetrics")
    from mct_fx.datasets import fashion_mnist_available

    if not fashion_mnist_available():
        pytest.skip("needs apt-get install -y dataset-fashion-mnist")
    import train_detection
    from detection_data import Mosaics, mosaics

    model, _ = train_detection.load(name)
    test = train_detection.test_canvases()
    test = Mosaics(test.images[:300], test.targets[:300])
    return (model, test, lambda m: train_detection.mean_ap(m, name, test)["map"],
            lambda n: list(mosaics("train", n, seed=3).images.split(32)))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["yolo", "ssd"])
def test_a_trained_detector_keeps_its_map_and_exports(name, tmp_path):
    """W8A8 for imx500_16bit (16-bit box coordinates, the rest 8-bit) keeps mAP@0.5:0.95 within 1 point on 300
    test canvases, the IMX500 file carries Sony's ops and runs as the GraphModule does."""
    model, test, mean_ap, calibration = _trained_detector(name)
    qmodel = mct_fx.quantize(model, calibration(128), "imx500_16bit", verbose=False)
    float_map, quant_map = mean_ap(model), mean_ap(qmodel)
    assert float_map > 35
    assert quant_map >= float_map - 1.0, (float_map, quant_map)
    _check_imx500_file(qmodel, test, name, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["yolo", "ssd"])
def test_optq_keeps_a_trained_detector_at_w4a8_and_exports(name, tmp_path):
    """OPTQ rounding at 4-bit kernels (YOLO's fixed DFL readout at 8): within 3 points of float on 300 test
    canvases and above PTQ's nearest rounding (benchmark, 2000 canvases: drops 1.55 / 1.47); the IMX500 file
    runs as the GraphModule does."""
    from mct_fx.tpc.derive import with_bits

    model, test, mean_ap, calibration = _trained_detector(name)
    calib = calibration(256)
    tpc = with_bits(mct_fx.get_tpc("imx500_16bit"), weights=4)
    keep = tuple(mct_fx.LayerOverride(name="dfl", weights_n_bits=8) for _ in [0] if hasattr(model, "dfl"))
    nearest = mct_fx.quantize(model, calib, tpc, mct_fx.QuantConfig(overrides=keep), verbose=False)
    optq = mct_fx.quantize(model, calib, tpc, mct_fx.QuantConfig(overrides=keep, optq=mct_fx.OPTQConfig()),
                           verbose=False)
    maps = {"float": mean_ap(model), "nearest": mean_ap(nearest), "optq": mean_ap(optq)}
    assert maps["optq"] >= maps["float"] - 3.0 and maps["optq"] > maps["nearest"], maps
    _check_imx500_file(optq, test, name, tmp_path)


def _check_imx500_file(qmodel, test, name: str, tmp_path) -> None:
    result = mct_fx.export_imx500(qmodel, test.images[:1], tmp_path / f"{name}.onnx")
    ops = {n.op_type for n in onnx.load(str(result.path)).graph.node if n.domain == EDGEMDT_DOMAIN}
    assert ops == ({"MultiClassNMS", "FasterRCNNBoxDecode"} if name == "ssd" else {"MultiClassNMS"})
    assert result.agreement is not None and result.agreement.faithful


@pytest.mark.skipif(edgemdt_session_options() is None, reason="needs onnxruntime-extensions")
@pytest.mark.parametrize("make", [_detector, lambda: TinySsd().eval()], ids=["anchor-free", "ssd"])
def test_qdq_file_keeps_sonys_ops_and_runs_as_the_graph_module(make, tmp_path):
    """The QDQ export writes the NMS / box decoding as the same EdgeMDT ops and checks the file with their
    reference kernels: the outputs are the GraphModule's, bit for bit."""
    torch.manual_seed(0)
    qmodel = mct_fx.quantize(make(), DATA, "int8", verbose=False)
    x = DATA[1][:1]
    result = mct_fx.export_onnx(qmodel, x, tmp_path / "det_qdq.onnx")
    model = onnx.load(str(result.path))
    assert "MultiClassNMS" in {n.op_type for n in model.graph.node if n.domain == EDGEMDT_DOMAIN}
    assert (EDGEMDT_DOMAIN, 1) in {(o.domain, o.version) for o in model.opset_import}
    assert result.n_quantize > 0 and result.agreement is not None and result.agreement.max_abs_diff == 0
    for got, expected in zip(run_onnxruntime(result.path, (x,), edgemdt_session_options()),
                             graph_outputs(qmodel, (x,)), strict=True):
        assert torch.equal(got, expected)


def test_qdq_file_with_sonys_ops_is_not_run_without_their_kernels(tmp_path, monkeypatch, caplog):
    import sys

    monkeypatch.setattr(sys.modules["mct_fx.export"], "edgemdt_session_options", lambda: None)
    qmodel = mct_fx.quantize(_detector(), DATA, "int8", verbose=False)
    with caplog.at_level(logging.WARNING, logger="mct_fx"):
        result = mct_fx.export_onnx(qmodel, DATA[1][:1], tmp_path / "det_qdq.onnx")
    assert result.agreement is None and result.path.exists()
    assert "EdgeMDT ops" in caplog.text and "mct-fx[imx500]" in caplog.text
