"""The shape of the pipeline: declared stages, stage-named errors, quantizer roles, the recorded target."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

import mct_fx
from mct_fx.meta import PREPARATION, Role, quantizer_module, quantizer_node, quantizer_nodes_by_role
from mct_fx.ptq import STAGES
from mct_fx.quantizers import ActivationQuantizer, WeightQuantizer
from mct_fx.stages import Stage, retention, run_stages
from mct_fx.tpc.derive import with_bits


def _model() -> nn.Module:
    torch.manual_seed(0)
    model = torchvision.models.mobilenet_v3_small(num_classes=10)
    model.train()
    with torch.no_grad():  # BN statistics that are not the identity
        for _ in range(2):
            model(torch.randn(8, 3, 64, 64))
    return model.eval()


DATA = [torch.randn(8, 3, 64, 64, generator=torch.Generator().manual_seed(i)) for i in range(3)]


def test_stages_read_like_the_design_pipeline():
    assert [s.name for s in STAGES] == [
        "prepare", "mixed precision: plan", "observe layer inputs", "calibrate", "tensorboard: calibration",
        "remove input observers", "power-of-two alignment", "softmax shift", "mixed precision: keep histograms",
        "HMSE: weight Hessians", "freeze", "mixed precision: search", "concat unification",
        "weight rounding and correction", "summary", "tensorboard: result"]


def test_retention_is_the_most_any_running_stage_reads():
    stages = [Stage("a", lambda s: None, batches=lambda s: 4), Stage("b", lambda s: None, images=lambda s: 32),
              Stage("c", lambda s: None, when=lambda s: False, batches=lambda s: 99, images=lambda s: 99)]
    assert retention(stages, None) == (4, 32)


def test_a_failing_stage_keeps_its_type_and_is_named():
    class Boom(ValueError):
        pass

    def fail(state):
        raise Boom("no")

    stages = [Stage("first", lambda s: None), Stage("skipped", fail, when=lambda s: False), Stage("second", fail)]
    with pytest.raises(Boom) as info:
        run_stages("wf", stages, None)
    assert "wf: failed in stage 'second' (after: first)" in info.value.__notes__


def test_bad_calibration_batch_names_the_stage():
    bad = [DATA[0], DATA[1].clone().fill_(float("nan"))]
    with pytest.raises(mct_fx.CalibrationError) as info:
        mct_fx.quantize(_model(), bad, "imx500", verbose=False)
    assert "batch 1" in str(info.value)
    assert any("failed in stage 'calibrate' (after: prepare, observe layer inputs)" in n for n in info.value.__notes__)


def test_every_quantizer_records_its_node_and_role():
    qmodel = mct_fx.quantize(_model(), DATA, "imx500", verbose=False)
    records = list(quantizer_nodes_by_role(qmodel))
    quantizers = [n for n in qmodel.graph.nodes if n.op == "call_module"
                  and isinstance(qmodel.get_submodule(n.target), (ActivationQuantizer, WeightQuantizer))]
    assert len(records) == len(quantizers) > 0
    nodes = {n.name: n for n in qmodel.graph.nodes}
    for q, record in records:
        served = nodes[record.node]
        if record.role is Role.ACTIVATION:
            assert q.args[0] is served
        else:
            assert served in q.users and served.args[1 if record.role is Role.WEIGHT else 2] is q
    conv = next(n for n in qmodel.graph.nodes if n.target is torch.nn.functional.conv2d)
    assert isinstance(quantizer_module(qmodel, conv.name, Role.WEIGHT), WeightQuantizer)
    assert quantizer_node(qmodel, conv.name, Role.BIAS) is None  # the IMX500 keeps biases float


@pytest.mark.parametrize("kind", ["derived", "json"])
def test_a_custom_target_is_found_again(kind, tmp_path):
    """compare and troubleshoot(verify=True) prepare / quantize again with the TPC itself, not its name."""
    tpc = with_bits(mct_fx.get_tpc("imx500"), weights=4)
    if kind == "json":
        mct_fx.save_tpc(tpc, tmp_path / "w4.json")
        tpc = str(tmp_path / "w4.json")
    model = _model()
    qmodel = mct_fx.quantize(model, DATA, tpc, verbose=False)
    assert qmodel.meta[PREPARATION].tpc.name == mct_fx.get_tpc(tpc).name
    table = mct_fx.compare(model, qmodel, DATA[:1])
    assert table.reference.startswith("float model (prepared again")
    report = mct_fx.troubleshoot(model, qmodel, DATA[:1], verify=True, verbose=False,
                                 config=mct_fx.TroubleshootConfig(sqnr_db=60, max_verify=1))
    assert report.verify_baseline is not None
    assert any(f.measured is not None for f in report.findings)


class _Gate(nn.Module):
    """Untraceable on purpose (data-dependent control flow): must stay a leaf."""

    def forward(self, x):
        return x if x.sum() > 0 else -x


class _WithLeaf(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.gate = _Gate()
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.head(self.gate(torch.relu(self.conv(x))))


def test_leaf_modules_are_recorded_and_reused():
    model = _WithLeaf().eval()
    qmodel = mct_fx.quantize(model, DATA, "imx500", verbose=False, leaf_modules=[_Gate])
    assert qmodel.meta[PREPARATION].leaf_modules == (_Gate,)
    table = mct_fx.compare(model, qmodel, DATA[:1])
    assert table.reference.startswith("float model (prepared again")
