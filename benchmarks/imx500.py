"""To the IMX500: mct_fx's MCTQ export beside Sony MCT's, both through the same converter (imxconv-pt).

    python benchmarks/imx500.py [--models demo,mobilenet_v2,...] [--mct-python PATH] [--converter PATH]
                                [--n-eval 64] [--json benchmarks/results/imx500.json]

Per model and tool: PTQ for the IMX500 (W8A8, power-of-two activations), the
export in MCTQ ONNX (ours: ``mct_fx.export_imx500``; MCT: ``pytorch_export_model``
with ``QuantizationFormat.MCTQ``, ``torch.onnx.export`` forced to the TorchScript
exporter, which MCT 2.6 needs on torch 2.14), then ``imxconv-pt``: converts yes/no
(with the converter's error), export and conversion seconds, ``packerOut.zip``
size, memory report; and the fidelity of the converted file itself, run in
onnxruntime with the reference kernels of ``mct-quantizers`` one image at a
time: SQNR of its outputs against the float model's and top-1 agreement with
the float model (also with labels for the Fashion-MNIST pair).  Both tools get
the same models, calibration and evaluation data.  `nox -s imx500` runs it.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import peers
import zoo

HERE = os.path.dirname(os.path.abspath(__file__))
MODELS = ("fmnist_resnet", "fmnist_mobilenet", "resnet18", "mobilenet_v2", "efficientnet_b0", "regnet_y_400mf",
          "shufflenet_v2_x1_0", "mobilenet_v3_large", "lite_convs")


class LiteConv(nn.Conv2d):
    """A conv whose ``forward`` calls ``F.conv2d`` itself, as some EfficientNet-Lite ports write it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)


def lite_convs() -> nn.Module:
    """A small MobileNet-style network built from ``LiteConv``."""
    def block(cin, cout, stride, groups=1, k=3):
        return [LiteConv(cin, cout, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout), nn.ReLU6()]

    layers = block(3, 16, 2) + block(16, 16, 1, 16) + block(16, 32, 1, k=1) + block(32, 32, 2, 32) + \
        block(32, 64, 1, k=1) + block(64, 64, 2, 64) + block(64, 128, 1, k=1)
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(128, 10))


def build(name: str) -> tuple[nn.Module, list[torch.Tensor], torch.Tensor, torch.Tensor | None]:
    """``(model, calibration batches, evaluation images, labels or None)``, the same in both venvs."""
    torch.manual_seed(0)
    if name.startswith("fmnist_"):
        import train_fmnist

        import assets

        model, _ = train_fmnist.load(name)
        x, _ = assets.fashion_mnist("train")
        xt, yt = assets.fashion_mnist("test")
        order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))[:256]
        return model, list(x[order].split(32)), xt[:N_EVAL], yt[:N_EVAL]
    if name == "mobilenet_v2":
        import assets

        assets.mobilenet_v2_weights()
        model = torchvision.models.mobilenet_v2(weights="IMAGENET1K_V1").eval()
        calib, evaluation = assets.imagenet_fidelity_sets(n_calib=128, n_eval=N_EVAL)
        return model, list(calib.split(16)), evaluation, None
    if name in zoo.SQNR_ZOO:
        model, side = zoo.build(name)
    else:
        model = lite_convs() if name == "lite_convs" else torchvision.models.get_model(name, weights=None)
        side = 64
        zoo.reestimate_bn(model, side)
    return model.eval(), zoo.calibration(side), zoo.evaluation(side, N_EVAL), None


N_EVAL = int(os.environ.get("IMX500_BENCH_N_EVAL", "64"))


def _export_mct(qmodel: nn.Module, calib: list[torch.Tensor], path: str) -> None:
    import model_compression_toolkit as mct

    export = torch.onnx.export

    def torchscript_export(*args, **kwargs):  # MCT 2.6 calls the dynamo exporter, which fails on torch 2.14
        kwargs["dynamo"] = False
        return export(*args, **kwargs)

    torch.onnx.export = torchscript_export
    try:
        mct.exporter.pytorch_export_model(qmodel, path, lambda: iter([[calib[0][:1]]]),
                                          serialization_format=mct.exporter.PytorchExportSerializationFormat.ONNX,
                                          quantization_format=mct.exporter.QuantizationFormat.MCTQ)
    finally:
        torch.onnx.export = export


def work(tool: str, models: str, out_dir: str) -> dict:
    """Quantize and export each model with ``tool``; the files go to ``out_dir``."""
    out: dict = {}
    for name in models.split(","):
        model, calib, _, _ = build(name)
        row: dict = {}
        try:
            qmodel, row["quantize_s"] = peers.quantize_with(tool, model, calib)
        except Exception as e:  # noqa: BLE001 - a tool that cannot quantize a model is a result too
            out[name] = {"error": f"quantize: {type(e).__name__}: {str(e).strip().splitlines()[-1][:300]}"}
            continue
        path = os.path.join(out_dir, f"{tool}_{name}.onnx")
        start = time.perf_counter()
        try:
            if tool == "mct_fx":
                from mct_fx.export_imx500 import export_imx500

                export_imx500(qmodel, calib[0][:1], path, verify=False)
            else:
                _export_mct(qmodel, calib, path)
            row["export_s"], row["path"] = time.perf_counter() - start, path
        except Exception as e:  # noqa: BLE001
            row["error"] = f"export: {type(e).__name__}: {str(e).strip().splitlines()[-1][:300]}"
        out[name] = row
    return out


def fidelity(path: str, model: nn.Module, images: torch.Tensor, labels: torch.Tensor | None) -> dict:
    """The file's outputs (onnxruntime + the mct-quantizers kernels, one image at a time) against float."""
    import onnxruntime as ort

    from mct_fx.export_imx500 import reference_session_options

    session = ort.InferenceSession(path, reference_session_options(), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    got = torch.cat([torch.from_numpy(session.run(None, {name: x[None].numpy()})[0]) for x in images])
    with torch.no_grad():
        ref = model(images)
    noise = float((got - ref).pow(2).sum())
    out = {"sqnr_db": math.inf if noise == 0 else 10 * math.log10(float(ref.pow(2).sum()) / noise),
           "top1_agreement": float((got.argmax(1) == ref.argmax(1)).float().mean())}
    if labels is not None:
        out["accuracy"] = float((got.argmax(1) == labels).float().mean())
        out["float_accuracy"] = float((ref.argmax(1) == labels).float().mean())
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--mct-python", default=os.environ.get("MCT_PYTHON"))
    parser.add_argument("--converter")
    parser.add_argument("--json", default=os.path.join(HERE, "results", "imx500.json"))
    args = parser.parse_args()
    from mct_fx.convert_imx500 import ConversionError, convert_imx500

    work_dir = tempfile.mkdtemp(prefix="imx500_bench_")
    results = {"mct_fx": peers.run_worker("mct_fx", "imx500", [args.models, work_dir]),
               "mct": peers.run_worker("mct", "imx500", [args.models, work_dir], args.mct_python)}
    models = args.models.split(",")
    for name in models:
        model, _, images, labels = build(name)
        for tool, rows in results.items():
            row = (rows or {}).get(name)
            if row is None or "path" not in row:
                continue
            try:
                package = convert_imx500(row["path"], os.path.join(work_dir, f"{tool}_{name}"), args.converter)
                row.update(converts=True, convert_s=package.seconds, zip_bytes=package.package.stat().st_size,
                           memory=str(package.memory), memory_share=package.memory.share)
            except ConversionError as e:
                row.update(converts=False, error=f"convert: {str(e).split('; full log')[0][:400]}")
            row.update(fidelity(row["path"], model, images, labels))
            print(name, tool, {k: v for k, v in row.items() if k != "path"}, flush=True)
        write(results, models, args.json)  # after each model: a long run leaves what it measured
    print("\n" + markdown(results, models))


def write(results: dict, models: list[str], path: str) -> None:
    """Merge this run's rows into the results file (rows of models not run here are kept), then the table."""
    merged = {}
    if os.path.exists(path):
        with open(path) as f:
            merged = json.load(f)
    for tool, rows in results.items():
        merged.setdefault(tool, {}).update({name: row for name, row in (rows or {}).items() if name in models})
    with open(path, "w") as f:
        json.dump(merged, f, indent=2)
    results, models = merged, [name for name in MODELS if any(name in rows for rows in merged.values())]
    with open(os.path.splitext(path)[0] + ".md", "w") as f:
        f.write(f"# IMX500: export + imxconv-pt, mct_fx beside MCT\n\n`python benchmarks/imx500.py` "
                f"({time.strftime('%Y-%m-%d')}; fidelity on {N_EVAL} evaluation images, one at a time, "
                "in onnxruntime with the mct-quantizers kernels, against the float model)\n\n"
                + markdown(results, models))


def markdown(results: dict, models: list[str]) -> str:
    """One row per model and tool."""
    def num(row, key, fmt):
        return fmt.format(row[key]) if key in row else ""

    lines = ["| model | tool | converts | quantize s | export s | convert s | packerOut.zip KB | chip memory | "
             "file SQNR dB | top-1 vs float % | accuracy % (float) | error |", "|" + "---|" * 12]
    for name in models:
        for tool in ("mct_fx", "mct"):
            row = (results.get(tool) or {}).get(name)
            if row is None:
                continue
            accuracy = (f"{100 * row['accuracy']:.2f} ({100 * row['float_accuracy']:.2f})" if "accuracy" in row
                        else "")
            converts = {True: "yes", False: "no"}.get(row.get("converts"), "no")
            lines.append(" | ".join([f"| {name}", tool, converts, num(row, "quantize_s", "{:.1f}"),
                                     num(row, "export_s", "{:.1f}"), num(row, "convert_s", "{:.0f}"),
                                     f"{row['zip_bytes'] / 1024:.0f}" if "zip_bytes" in row else "",
                                     row.get("memory", ""), num(row, "sqnr_db", "{:.2f}"),
                                     f"{100 * row['top1_agreement']:.1f}" if "top1_agreement" in row else "",
                                     accuracy, row.get("error", "").replace("|", "/")]) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__" and "--worker" not in sys.argv:
    main()
