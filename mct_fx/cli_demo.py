"""``mct-fx demo``: the embedded Fashion-MNIST CNN, quantized, exported (QDQ and IMX500) and, where
``imxconv-pt`` is installed, converted for the chip."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

__all__ = ["demo"]


def demo(args: argparse.Namespace) -> int:
    """``mct-fx demo``: the embedded CNN quantized, exported as QDQ and for the IMX500, converted when it can be."""
    import mct_fx
    from mct_fx.demo import load_model as demo_model
    from mct_fx.demo import load_samples
    from mct_fx.export import export_onnx
    from mct_fx.resources import float_weights_memory

    start = time.time()
    model = demo_model()
    calib, images, labels = load_samples()
    loader = torch.utils.data.DataLoader(calib, batch_size=64)
    qmodel = mct_fx.quantize(model, loader, args.tpc, verbose=False)
    seconds = time.time() - start
    path = Path(args.out) / "model.onnx"
    # uint8 weight codes: onnxruntime's fused int8 kernels saturate signed weights on x86 CPUs
    # without VNNI (this demo's accuracy would drop by about half a point there)
    export = export_onnx(qmodel, images[:16], path, weights_dtype="uint8")
    with torch.no_grad():
        float_acc = _accuracy(model(images), labels)
        quant_acc = _accuracy(qmodel(images), labels)
    onnx_acc = _onnx_accuracy(path, images, labels)
    imx = _demo_imx500(qmodel, images, labels, Path(args.out), args.converter)
    float_bytes, quant_bytes = float_weights_memory(qmodel), mct_fx.resource_utilization(qmodel).weights_memory
    print(f"mct-fx demo: a CNN trained on Fashion-MNIST, quantized for {args.tpc} "
          f"with {len(calib)} calibration images in {seconds:.1f} s\n")
    rows = [("", "accuracy (500 test images)", "weights"),
            ("float", f"{float_acc:.1f}%", f"{float_bytes / 1024:.0f} KiB"),
            ("quantized (PyTorch)", f"{quant_acc:.1f}%", f"{quant_bytes / 1024:.0f} KiB")]
    if onnx_acc is not None:
        rows.append(("quantized (onnxruntime)", f"{onnx_acc:.1f}%", ""))
    if imx["accuracy"] is not None:
        rows.append(("IMX500 ONNX (onnxruntime + mct-quantizers)", f"{imx['accuracy']:.1f}%", ""))
    if imx["package"] is not None:
        rows.append(("IMX500 package (imxconv-pt)", "", f"{imx['package'].memory}"))
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
    print(f"\nwrote {path} ({export.n_quantize} QuantizeLinear, {export.n_dequantize} DequantizeLinear)")
    print(f"wrote {imx['export'].path} (IMX500: {', '.join(f'{v} {k}' for k, v in imx['export'].quantizers.items())})")
    if imx["package"] is not None:
        print(f"wrote {imx['package'].package} (converted in {imx['package'].seconds:.0f} s)")
    else:
        print(f"  {imx['skipped']}")
    return 0


def _demo_imx500(qmodel, images: torch.Tensor, labels: torch.Tensor, out: Path, converter: str | None) -> dict:
    """The IMX500 step of the demo: the MCTQ file, its accuracy with the reference kernels, the package."""
    from mct_fx.convert_imx500 import ConversionError, convert_imx500, find_converter
    from mct_fx.export_imx500 import export_imx500, reference_session_options

    export = export_imx500(qmodel, images[:1], out / "model_imx500.onnx")
    accuracy = None
    options = reference_session_options()
    if options is not None:
        import onnxruntime as ort

        session = ort.InferenceSession(str(export.path), options, providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name
        logits = torch.cat([torch.from_numpy(session.run(None, {name: x[None].numpy()})[0]) for x in images])
        accuracy = _accuracy(logits, labels)
    try:
        find_converter(converter)
    except ConversionError:
        return {"export": export, "accuracy": accuracy, "package": None,
                "skipped": "the IMX500 converter is not installed, so no package: `nox -s imx500` builds it "
                           "(or: python3 -m venv v && v/bin/pip install 'imx500-converter[pt]')"}
    print("converting for the IMX500 with imxconv-pt (about a minute)...", flush=True)
    return {"export": export, "accuracy": accuracy, "package": convert_imx500(export.path, out / "imx500", converter),
            "skipped": None}


def _accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return float((logits.argmax(1) == labels).float().mean()) * 100


def _onnx_accuracy(path: Path, images: torch.Tensor, labels: torch.Tensor) -> float | None:
    try:
        import onnxruntime as ort
    except ImportError:
        return None
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    logits = session.run(None, {session.get_inputs()[0].name: images.numpy()})[0]
    return _accuracy(torch.from_numpy(logits), labels)
