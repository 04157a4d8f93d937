"""mct_fx.compare (per-layer float vs quantized metrics) and the TensorBoard logs of the pipeline."""

from __future__ import annotations

import copy
import math

import pytest
import torch

import mct_fx
from mct_fx.demo import load_model, load_samples
from mct_fx.quantizers.modules import FakeQuantizer


@pytest.fixture(scope="module")
def demo():
    model = load_model()
    calib, images, labels = load_samples()
    return model, calib[:128], images[:128]


def test_identical_models_give_infinite_sqnr_and_cosine_one(demo):
    model, calib, _ = demo
    config = mct_fx.QuantConfig(weights_bias_correction=False)  # with the quantizers off: the float function
    q = mct_fx.quantize(model, calib, "imx500", config, verbose=False)
    for m in q.modules():
        if isinstance(m, FakeQuantizer):
            m.mode = "off"
    c = mct_fx.compare(model, q, calib)
    assert c.reference.startswith("float model")
    assert len(c.layers) >= 10
    relu1 = c.layer("relu1")  # conv1 -> relu1 is one layer on the target: compared at its output
    assert relu1.fused == ("conv1",) and relu1.op == "Conv+ReLU" and relu1.weights.startswith("8b")
    assert "conv1" not in c.graph_order and c.layer("relu2").inputs == ("relu1",)
    for row in c.layers:
        assert row.metrics["sqnr"] == math.inf and row.metrics["mse"] == 0, row
        assert row.metrics["cosine"] == pytest.approx(1.0, abs=1e-12)
    assert c.output["sqnr"] == math.inf


def test_a_layer_with_injected_error_is_ranked_first(demo):
    model, calib, images = demo
    q = mct_fx.quantize(model, calib, "imx500", verbose=False)
    clean = mct_fx.compare(model, q, calib)
    worst_before = clean.layers[0].node
    victim = "relu3" if worst_before != "relu3" else "relu2"
    quantizer = q.get_submodule(f"{victim}_act_quant")
    quantizer.set_grid(quantizer.scale * 16, quantizer.zero_point)  # 4 bits fewer resolution on one layer
    c = mct_fx.compare(model, q, calib, validation=images)
    assert c.layers[0].node == victim
    assert c.layer(victim).metrics["sqnr"] < clean.layer(victim).metrics["sqnr"] - 10
    assert c.layers[0].validation is not None and c.layers[0].validation["sqnr"] < clean.layer(victim).metrics["sqnr"]
    text = str(c)
    assert victim in text.splitlines()[3] and "sqnr (val)" in text  # header, rule, then the worst row


def test_custom_metrics_and_order(demo):
    model, calib, _ = demo
    q = mct_fx.quantize(model, calib, "imx500", verbose=False)

    def max_abs_error(ref, out):
        return (ref - out).abs().max()

    c = mct_fx.compare(model, q, calib, metrics=(max_abs_error, "sqnr"))
    assert c.metrics == ("max_abs_error", "sqnr")
    errors = [r.metrics["max_abs_error"] for r in c.layers]
    assert errors == sorted(errors, reverse=True) and errors[0] > 0  # an error: worst (largest) first
    d = c.to_dict()
    assert d["layers"][0]["node"] == c.layers[0].node and "stats" in d["layers"][0]


def test_models_are_untouched_and_bad_input_is_named(demo):
    model, calib, _ = demo
    q = mct_fx.quantize(model, calib, "imx500", verbose=False)
    before_f = copy.deepcopy(model.state_dict())
    before_q = copy.deepcopy(q.state_dict())
    mct_fx.compare(model, q, calib)
    assert all(torch.equal(before_f[k], v) for k, v in model.state_dict().items())
    assert all(torch.equal(before_q[k], v) if isinstance(v, torch.Tensor) else before_q[k] == v
               for k, v in q.state_dict().items())  # extra states (quantizer modes) too
    with pytest.raises(ValueError, match="unknown metric 'psnr'"):
        mct_fx.compare(model, q, calib, metrics=("psnr",))
    with pytest.raises(ValueError, match="GraphModule with quantizers"):
        mct_fx.compare(model, model, calib)
    with pytest.raises(mct_fx.CalibrationError):
        mct_fx.compare(model, q, [])


def test_without_a_matching_float_graph_the_quantizers_off_twin_is_the_reference(demo):
    model, calib, _ = demo
    q = mct_fx.quantize(model, calib, "imx500", verbose=False)
    del q.meta["mct_fx.config"]  # as from an older version: the float model cannot be prepared the same way
    c = mct_fx.compare(model, q, calib)
    assert c.reference.startswith("quantized model with its quantizers off")
    assert c.output["sqnr"] > 20


# ------------------------------------------------------------------ TensorBoard


def _tags(log_dir):
    from tensorboard.backend.event_processing.event_multiplexer import EventMultiplexer

    mux = EventMultiplexer().AddRunsFromDirectory(str(log_dir))
    mux.Reload()
    return mux.Runs()


def test_tensorboard_logs_the_pipeline(tmp_path, demo):
    model, calib, _ = demo
    log_dir = tmp_path / "tb"
    budget = mct_fx.ResourceUtilization(weights_memory=0.5 * sum(p.numel() for p in model.parameters()))
    q = mct_fx.quantize(model, calib, "imx500", mct_fx.QuantConfig(log_dir=str(log_dir)), target=budget,
                        verbose=False)
    runs = _tags(log_dir)
    assert {"graph_1_traced", "graph_2_passes", "graph_3_quantized"} <= set(runs)
    assert all(runs[f"graph_{s}"]["graph"] for s in ("1_traced", "2_passes", "3_quantized"))
    main = runs["."]
    layers = {r.node for r in mct_fx.summary(q).layers}
    assert "calibration/relu1" in main["histograms"] and "weights/conv1/threshold" in main["histograms"]
    assert "ranges/relu1/channel_absmax" in main["histograms"]
    assert "threshold/relu1" in main["scalars"]
    assert {"similarity/sqnr/output", "similarity/cosine/output"} <= set(main["scalars"])
    assert {f"similarity/sqnr/{n}" for n in ("input_1", "relu1", "fc")} <= set(main["scalars"])
    assert "resource_utilization/weights_memory" in main["scalars"]
    assert any(t.startswith("mixed_precision/bits/") and t.split("/")[-1] in layers for t in main["scalars"])
    assert "mixed_precision/bit_widths" in main["images"]
    assert {"thresholds/text_summary", "similarity/text_summary", "graph/1_traced/text_summary"} <= set(
        main["tensors"])


def test_tensorboard_gptq_and_datagen_losses(tmp_path, demo):
    model, calib, _ = demo
    log_dir = tmp_path / "tb"
    mct_fx.gptq(model, calib[:64], "imx500", mct_fx.GPTQConfig(epochs=3), quant_config=mct_fx.QuantConfig(
        log_dir=str(log_dir)), verbose=False)
    mct_fx.generate_data(model, 16, (1, 28, 28), mct_fx.DataGenConfig(
        n_iter=4, batch_size=16, normalization="none", extra_pixels=2, log_dir=str(log_dir / "datagen")),
        verbose=False)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir))
    acc.Reload()
    assert [e.step for e in acc.Scalars("gptq/distance")] == [1, 2, 3]
    gen = EventAccumulator(str(log_dir / "datagen"))
    gen.Reload()
    assert len(gen.Scalars("datagen/bn_loss")) == 4 and len(gen.Scalars("datagen/output_loss")) == 4
    assert len(_tags(log_dir)["graph_1_traced"]["run_metadata"]) <= 1  # the teacher's prepare logs nothing


def test_tensorboard_qat_finalize_logs_the_learned_grids_as_a_run(tmp_path, demo):
    model, calib, _ = demo
    log_dir = tmp_path / "tb"
    qat = mct_fx.qat_prepare(model, calib[:64], "imx500", mct_fx.QATConfig(method="lsq"),
                             quant_config=mct_fx.QuantConfig(log_dir=str(log_dir)), verbose=False)
    mct_fx.qat_finalize(qat)
    runs = _tags(log_dir)
    assert "threshold/relu1" in runs["qat_finalized"]["scalars"]
    assert "threshold/relu1" in runs["."]["scalars"]  # the PTQ start, same tag: overlaid in TensorBoard


def test_log_dir_is_validated():
    with pytest.raises(TypeError, match="log_dir must be a path"):
        mct_fx.QuantConfig(log_dir=3)

