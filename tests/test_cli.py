"""The ``mct-fx`` command: demo, quantize, tpc; one-line errors with exit status 2."""

import json
import os
import re
import subprocess
import sys

import onnxruntime as ort
import pytest
import torch

import mct_fx
from mct_fx import datasets
from mct_fx.cli import main
from mct_fx.convert_imx500 import ConversionError, find_converter
from mct_fx.demo import load_model, load_samples


def _cli(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "mct_fx.cli", *args], capture_output=True, text=True,
                          timeout=timeout)


def _has_converter() -> bool:
    try:
        find_converter()
        return True
    except ConversionError:
        return False


def test_demo_prints_accuracies_and_reaches_the_chip(tmp_path):
    """The demo: QDQ ONNX, the IMX500 file and, where imxconv-pt is installed (always in CI: `nox -s
    converter`), its package from the real converter: every landing proves the demo reaches the chip."""
    run = _cli("demo", "--out", str(tmp_path))
    assert run.returncode == 0, run.stderr
    rows = r"float|quantized \(PyTorch\)|quantized \(onnxruntime\)|IMX500 ONNX \(onnxruntime \+ mct-quantizers\)"
    acc = dict(re.findall(rf"^({rows})\s+([\d.]+)%", run.stdout, re.M))
    assert set(acc) == {"float", "quantized (PyTorch)", "quantized (onnxruntime)",
                        "IMX500 ONNX (onnxruntime + mct-quantizers)"}, run.stdout
    assert float(acc["float"]) > 85
    assert abs(float(acc["quantized (PyTorch)"]) - float(acc["float"])) <= 1.0
    assert abs(float(acc["quantized (onnxruntime)"]) - float(acc["quantized (PyTorch)"])) <= 0.5
    assert acc["IMX500 ONNX (onnxruntime + mct-quantizers)"] == acc["quantized (PyTorch)"]  # exact agreement
    assert (tmp_path / "model.onnx").stat().st_size > 0 and (tmp_path / "model_imx500.onnx").stat().st_size > 0
    if _has_converter() or os.environ.get("CI"):
        assert re.search(r"^IMX500 package \(imxconv-pt\)\s+[\d.]+ MB of 8 MB \([\d.]+%\), fits in the chip",
                         run.stdout, re.M), run.stdout
        assert (tmp_path / "imx500" / "packerOut.zip").stat().st_size > 10_000
    else:
        assert "the IMX500 converter is not installed" in run.stdout


def test_bad_tpc_path_is_one_line_and_status_2(tmp_path):
    run = _cli("quantize", "--model", "demo", "--calib", "random", "--tpc", str(tmp_path / "nope.json"),
               "--out", str(tmp_path / "out"))
    assert run.returncode == 2
    lines = [ln for ln in run.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("mct-fx: error:") and "nope.json" in lines[0], run.stderr
    assert "Traceback" not in run.stderr
    assert not (tmp_path / "out").exists()  # nothing half-done


def test_debug_shows_the_traceback(tmp_path):
    with pytest.raises(mct_fx.TPCError):
        main(["--debug", "quantize", "--model", "demo", "--calib", "random", "--tpc", "nope",
              "--out", str(tmp_path)])


def test_quantize_demo_model_writes_its_three_outputs(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["quantize", "--model", "demo", "--calib", "random", "--n-calib", "64", "--quiet",
                 "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "conv1" in printed and "FullyConnected" in printed  # the per-layer table
    report = json.loads((out / "report.json").read_text())
    assert report["tpc"] == "imx500" and report["n_calib"] == 64
    assert {layer["node"] for layer in report["layers"]} >= {"conv1", "conv5", "fc"}
    assert report["weights_bytes"]["quantized"] < report["weights_bytes"]["float"] / 3
    assert report["onnx"]["agreement_with_graph_module"]["sqnr_onnx_db"] > 20
    # the saved state reproduces the quantized model; the ONNX file runs
    state = torch.load(out / "quantized_state.pt", weights_only=False)
    _, images, _ = load_samples()
    qmodel = mct_fx.prepare(load_model(), images[:4], state["tpc"])
    qmodel.load_state_dict(state["state_dict"])
    onnx_out = ort.InferenceSession(str(out / "model.onnx")).run(None, {"input": images[:4].numpy()})[0]
    with torch.no_grad():
        assert (torch.from_numpy(onnx_out) - qmodel(images[:4])).abs().max() < 1.0


def test_weights_memory_budget_runs_mixed_precision(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["quantize", "--model", "demo", "--calib", "random", "--n-calib", "64", "--quiet",
                 "--weights-memory", "0.15", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "mixed precision" in printed and "achieved" in printed
    report = json.loads((out / "report.json").read_text())
    mp = report["mixed_precision"]
    float_bytes = 4 * sum(p.numel() for p in load_model().parameters())
    assert mp["target"]["weights_memory"] == pytest.approx(0.15 * float_bytes)
    assert report["weights_bytes"]["quantized"] == mp["achieved"]["weights_memory"] <= 0.15 * float_bytes
    assert {"W8", "W4"} <= set(mp["bits"].values())
    # OPTQ rounding on the mixed-precision grids: the same budget holds
    assert main(["quantize", "--model", "demo", "--calib", "random", "--n-calib", "64", "--quiet", "--optq",
                 "--weights-memory", "0.15", "--out", str(tmp_path / "optq")]) == 0
    optq = json.loads((tmp_path / "optq" / "report.json").read_text())
    assert optq["weights_bytes"]["quantized"] <= 0.15 * float_bytes
    # a budget below every layer at 2 bits: one line naming the smallest achievable size, nothing written
    assert main(["quantize", "--model", "demo", "--calib", "random", "--n-calib", "64", "--quiet",
                 "--weights-memory", "1000", "--out", str(tmp_path / "none")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "smallest achievable" in err[0], err
    assert not (tmp_path / "none").exists()


def test_data_free_quantization_of_the_demo_model(tmp_path, capsys):
    """--calib synthetic: calibration images generated from the model's BatchNorm statistics."""
    out = tmp_path / "out"
    assert main(["quantize", "--model", "demo", "--calib", "synthetic", "--n-calib", "64", "--datagen-iters", "40",
                 "--quiet", "--out", str(out)]) == 0
    assert "from the BatchNorm statistics" in capsys.readouterr().out
    report = json.loads((out / "report.json").read_text())
    assert report["calibration"] == "synthetic" and report["calibration_seconds"] > 0
    state = torch.load(out / "quantized_state.pt", weights_only=False)
    _, images, labels = load_samples()
    qmodel = mct_fx.prepare(load_model(), images[:4], state["tpc"])
    qmodel.load_state_dict(state["state_dict"])
    with torch.no_grad():
        accuracy = float((qmodel(images).argmax(1) == labels).float().mean()) * 100
        float_accuracy = float((load_model()(images).argmax(1) == labels).float().mean()) * 100
    assert accuracy >= float_accuracy - 2, (float_accuracy, accuracy)


def test_quantize_a_model_from_a_python_file(tmp_path, capsys):
    (tmp_path / "mine.py").write_text(
        "import torch.nn as nn\n"
        "def build():\n"
        "    m = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))\n"
        "    m.input_shape = (3, 16, 16)\n"
        "    return m\n")
    weights = tmp_path / "w.pt"
    torch.manual_seed(0)
    exec_ns = {}
    exec((tmp_path / "mine.py").read_text(), exec_ns)
    torch.save(exec_ns["build"]().state_dict(), weights)
    assert main(["quantize", "--model", f"{tmp_path / 'mine.py'}:build", "--weights", str(weights),
                 "--calib", "random", "--n-calib", "8", "--tpc", "int8", "--quiet",
                 "--out", str(tmp_path / "out")]) == 0
    assert (tmp_path / "out" / "model.onnx").exists()


@pytest.mark.parametrize("args, message", [
    (["--model", "torchvision:resnet99"], "no classification model 'resnet99'"),
    (["--model", "nonsense"], "use torchvision:NAME, PATH.py:FACTORY or demo"),
    (["--model", "missing.py:build"], "missing.py does not exist"),
    (["--model", "demo", "--weights", "missing.pt"], "missing.pt does not exist"),
    (["--model", "demo", "--calib", "imagefolder:/no/such/dir"], "does not exist"),
    (["--model", "demo", "--calib", "webcam"], "use imagefolder:DIR, fashion-mnist, synthetic or random"),
    (["--model", "demo", "--n-calib", "0"], "--n-calib must be >= 1"),
    (["--model", "torchvision:resnet18", "--calib", "random", "--input-shape", "1,28,28"],
     "does not run through the model at node 'conv1'"),
])
def test_bad_arguments_name_the_flag(args, message, tmp_path, capsys):
    base = {"--calib": "random"}
    argv = ["quantize", *args]
    for flag, value in base.items():
        if flag not in args:
            argv += [flag, value]
    assert main([*argv, "--quiet", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err


@pytest.mark.skipif(not datasets.fashion_mnist_available(), reason="Fashion-MNIST not installed")
def test_quantize_demo_model_on_fashion_mnist(tmp_path, capsys):
    assert main(["quantize", "--model", "demo", "--calib", "fashion-mnist", "--n-calib", "128", "--quiet",
                 "--out", str(tmp_path)]) == 0
    assert json.loads((tmp_path / "report.json").read_text())["calibration"] == "fashion-mnist"


def test_tpc_list_and_show(capsys):
    assert main(["tpc", "list"]) == 0
    listed = capsys.readouterr().out
    assert all(name in listed for name in ("imx500", "imx500_16bit", "int8", "noquant"))
    assert main(["tpc", "show", "imx500"]) == 0
    shown = capsys.readouterr().out
    assert re.search(r"^Conv\s+W8 symmetric per-channel, A8 power_of_two\s+W8/4/2, A8$", shown, re.M), shown
    assert "Conv|ConvTranspose -> " in shown
    assert main(["tpc", "show", "int8", "--json"]) == 0
    assert mct_fx.tpc.tpc_from_dict(json.loads(capsys.readouterr().out)).name == "int8"
    assert main(["tpc", "show", "nope"]) == 2


def test_quantize_on_an_image_folder(tmp_path, capsys):
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    for cls in ("cats", "dogs"):
        (tmp_path / "images" / cls).mkdir(parents=True)
        for i in range(3):
            pixels = (torch.rand(40, 48, 3, generator=g) * 255).to(torch.uint8).numpy()
            Image.fromarray(pixels).save(tmp_path / "images" / cls / f"{i}.png")
    (tmp_path / "net.py").write_text(
        "import torch.nn as nn\n"
        "def build():\n"
        "    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1),\n"
        "                         nn.Flatten(), nn.Linear(4, 2))\n")
    assert main(["quantize", "--model", f"{tmp_path / 'net.py'}:build", "--calib",
                 f"imagefolder:{tmp_path / 'images'}", "--n-calib", "5", "--batch-size", "2", "--image-size", "32",
                 "--quiet", "--out", str(tmp_path / "out")]) == 0
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["n_calib"] == 5 and report["onnx"]["QuantizeLinear"] >= 2


def test_quantize_writes_the_imx500_file(tmp_path, capsys):
    assert main(["quantize", "--model", "demo", "--calib", "random", "--n-calib", "64", "--quiet",
                 "--format", "imx500", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["onnx"]["format"] == "imx500" and report["onnx"]["ActivationPOTQuantizer"] > 0
    assert report["imx500"] is None  # no --convert
    assert "(imx500)" in capsys.readouterr().out
    assert main(["quantize", "--model", "demo", "--calib", "random", "--convert", "--out", str(tmp_path)]) == 2
    assert "--convert runs the IMX500 converter: add --format imx500" in capsys.readouterr().err
    assert main(["quantize", "--model", "demo", "--calib", "random", "--format", "imx500", "--convert",
                 "--converter", str(tmp_path / "nope"), "--out", str(tmp_path / "x")]) == 2
    assert "imx500-converter[pt]" in capsys.readouterr().err and not (tmp_path / "x").exists()
