"""The ``mct-fx`` command: ``quantize``, ``report``, ``demo``, ``tpc list`` / ``tpc show``.

Errors print one line (``mct-fx: error: ...``) and exit with status 2; ``--debug``
shows the traceback instead.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

import torch
from torch import nn

__all__ = ["main", "CLIError"]


class CLIError(Exception):
    """A user error the command reports in one line."""


# ------------------------------------------------------------------ arguments


def _model_arguments(p: argparse.ArgumentParser) -> None:
    """The arguments that build a quantized model (``quantize`` and ``report``)."""
    p.add_argument("--model", required=True, help="torchvision:NAME | PATH.py:FACTORY | demo")
    p.add_argument("--weights", help="a state_dict file; for torchvision models also a weights name "
                                      "(DEFAULT, IMAGENET1K_V1, ...) found in the torch hub cache")
    p.add_argument("--calib", required=True,
                   help="imagefolder:DIR | fashion-mnist | synthetic (data-free: generated from the model's "
                        "BatchNorm statistics) | random (standard-normal noise, for a smoke run)")
    p.add_argument("--n-calib", type=int, default=256, help="calibration images (default 256)")
    p.add_argument("--datagen-iters", type=int, default=500,
                   help="--calib synthetic: optimization passes over the images (default 500)")
    p.add_argument("--pixel-normalization", choices=("torchvision", "symmetric", "none"),
                   help="--calib synthetic: how the model normalizes pixels in [0, 1]: ImageNet mean/std, "
                        "[-1, 1], or none (default: none for the demo model, torchvision otherwise)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--image-size", type=int, default=224, help="imagefolder resize/crop size (default 224)")
    p.add_argument("--input-shape", help="C,H,W of one input for synthetic/random data (default: the model's "
                                          "input_shape attribute, else 3,IMAGE_SIZE,IMAGE_SIZE)")
    p.add_argument("--tpc", default="imx500", help="built-in target name or a TPC .json file (default imx500)")
    p.add_argument("--weights-memory", type=_budget, metavar="F|BYTES",
                   help="mixed precision under this weights budget: a fraction of the float model's weights "
                        "(0.2) or bytes (250000)")
    p.add_argument("--optq", action="store_true",
                   help="round the kernels with OPTQ (one-shot Hessian error feedback from the calibration inputs; "
                        "seconds) instead of to nearest")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    p.add_argument("--log-dir", help="TensorBoard logs of the pipeline go here (see mct_fx.tensorboard)")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mct-fx", description="PyTorch-native model compression on torch.fx graphs.")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = p.add_subparsers(dest="command", required=True)

    q = sub.add_parser("quantize", help="post-training quantization of a model, exported as QDQ ONNX")
    _model_arguments(q)
    q.add_argument("--out", required=True, help="output folder")
    q.add_argument("--opset", type=int, help="ONNX opset (default 20, 21 for 16-bit grids)")
    q.add_argument("--onnx-weights", choices=("int8", "uint8"), default="int8",
                   help="weight codes in the ONNX file; uint8 keeps onnxruntime exact on x86 CPUs without VNNI")
    q.add_argument("--format", choices=("qdq", "imx500"), default="qdq",
                   help="qdq: standard QuantizeLinear/DequantizeLinear ONNX (default); imx500: Sony's MCTQ ONNX "
                        "for the IMX500 converter (imxconv-pt)")
    q.add_argument("--convert", action="store_true",
                   help="--format imx500: also run imxconv-pt, writing OUT/imx500/packerOut.zip")
    q.add_argument("--converter", help="the imxconv-pt to run (default: $IMXCONV_PT, PATH, .nox/imx500)")

    r = sub.add_parser("report", help="quantize, then troubleshoot: per-layer comparison with the float model, "
                                      "degraded layers and their likely causes (report.json + report.html)")
    _model_arguments(r)
    r.add_argument("--out", required=True, help="output folder for report.json and report.html")
    r.add_argument("--sqnr-db", type=float, default=20.0, help="flag layers below this SQNR (default 20 dB)")
    r.add_argument("--verify", action="store_true",
                   help="quantize again with each suggested setting and report the output SQNR it gives")

    d = sub.add_parser("demo", help="quantize the embedded Fashion-MNIST CNN (no download, < 1 min)")
    d.add_argument("--out", default="mct_fx_demo", help="where model.onnx goes (default ./mct_fx_demo)")
    d.add_argument("--tpc", default="imx500")
    d.add_argument("--converter", help="the imxconv-pt to run (default: $IMXCONV_PT, PATH, .nox/imx500); "
                                       "without one the IMX500 step stops at the ONNX file")
    d.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)

    t = sub.add_parser("tpc", help="built-in target platforms")
    tsub = t.add_subparsers(dest="tpc_command", required=True)
    tsub.add_parser("list", help="names and one-line descriptions")
    show = tsub.add_parser("show", help="operator sets, bit-widths and fusing of one target")
    show.add_argument("name", help="built-in name or a .json file")
    show.add_argument("--json", action="store_true", help="print the JSON form")
    for sp in (t, show):
        sp.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        from mct_fx.cli_demo import demo

        return {"quantize": _quantize, "report": _report, "demo": demo, "tpc": _tpc}[args.command](args)
    except KeyboardInterrupt:
        print("mct-fx: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # one clear line; --debug for the traceback
        if args.debug:
            raise
        message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"mct-fx: error: {message}", file=sys.stderr)
        return 2


# ------------------------------------------------------------------ quantize


def load_model(spec: str, weights: str | None) -> nn.Module:
    """A model from ``torchvision:NAME``, ``PATH.py:FACTORY`` or ``demo``, with ``weights`` loaded."""
    if spec == "demo":
        from mct_fx.demo import load_model as demo_model

        model = demo_model()
    elif spec.startswith("torchvision:"):
        import torchvision

        name = spec.split(":", 1)[1]
        if name not in torchvision.models.list_models(module=torchvision.models):
            raise CLIError(f"--model: torchvision has no classification model {name!r}")
        named = weights is not None and not os.path.isfile(weights)  # DEFAULT, IMAGENET1K_V1, ...
        try:
            model = torchvision.models.get_model(name, weights=weights if named else None)
        except (KeyError, ValueError) as e:
            raise CLIError(f"--weights {weights}: not a file, nor a weights name torchvision knows for {name} "
                           f"({e})") from None
        except OSError as e:  # no network: the checkpoint is not in the torch hub cache
            raise CLIError(f"--weights {weights}: {name}'s weights are not in the torch hub cache "
                           f"({torch.hub.get_dir()}/checkpoints) and cannot be downloaded: {e}") from None
        if named:
            weights = None
    elif ":" in spec and spec.rsplit(":", 1)[0].endswith(".py"):
        path, factory = spec.rsplit(":", 1)
        if not os.path.isfile(path):
            raise CLIError(f"--model: {path} does not exist")
        module_spec = importlib.util.spec_from_file_location(Path(path).stem, path)
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
        if not callable(getattr(module, factory, None)):
            raise CLIError(f"--model: {path} has no callable {factory!r}")
        model = getattr(module, factory)()
        if not isinstance(model, nn.Module):
            raise CLIError(f"--model: {path}:{factory}() returned a {type(model).__name__}, not an nn.Module")
    else:
        raise CLIError(f"--model {spec!r}: use torchvision:NAME, PATH.py:FACTORY or demo")
    if weights is not None:
        if not os.path.isfile(weights):
            raise CLIError(f"--weights: {weights} does not exist")
        state = torch.load(weights, map_location="cpu", weights_only=True)
        try:
            model.load_state_dict(state.get("state_dict", state) if isinstance(state, dict) else state)
        except RuntimeError as e:
            raise CLIError(f"--weights {weights} does not fit the model: {str(e).splitlines()[0]}") from None
    return model.eval()


def calibration_loader(spec: str, n: int, batch_size: int, input_shape: tuple[int, ...], model: nn.Module,
                       args: argparse.Namespace):
    """The loader named by ``--calib`` (for ``synthetic``: the generated images, a tensor)."""
    from mct_fx import datasets

    if n < 1:
        raise CLIError(f"--n-calib must be >= 1, got {n}")
    if spec == "synthetic":
        from mct_fx.datagen import DataGenConfig, generate_data

        if args.datagen_iters < 1:
            raise CLIError(f"--datagen-iters must be >= 1, got {args.datagen_iters}")
        normalization = args.pixel_normalization or ("none" if args.model == "demo" else "torchvision")
        extra = max(2, min(32, min(input_shape[1:]) // 7))  # the canvas margin: 32 pixels at 224, 4 at 28
        config = DataGenConfig(n_iter=args.datagen_iters, batch_size=batch_size, normalization=normalization,
                               extra_pixels=extra if len(input_shape) == 3 else 0)
        return generate_data(model, n, input_shape, config, verbose=not args.quiet)
    if spec.startswith("imagefolder:"):
        side = input_shape[-1]
        return datasets.image_folder(spec.split(":", 1)[1], n, image_size=side, batch_size=batch_size)
    if spec == "fashion-mnist":
        x, y = datasets.fashion_mnist("train")
        order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))[:n]
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x[order], y[order]), batch_size=batch_size)
    if spec == "random":
        return datasets.synthetic(input_shape, n, batch_size)
    raise CLIError(f"--calib {spec!r}: use imagefolder:DIR, fashion-mnist, synthetic or random")


def _input_shape(args: argparse.Namespace, model: nn.Module) -> tuple[int, ...]:
    if args.input_shape:
        try:
            return tuple(int(v) for v in args.input_shape.split(","))
        except ValueError:
            raise CLIError(f"--input-shape {args.input_shape!r}: expected integers like 3,224,224") from None
    return tuple(getattr(model, "input_shape", (3, args.image_size, args.image_size)))


def _budget(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a fraction (0.25) or a number of bytes, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text!r}")
    return value


def _build(args: argparse.Namespace) -> tuple:
    """Model, calibration data and the quantized model as the shared arguments ask, with timings."""
    import mct_fx
    from mct_fx.resources import float_weights_memory

    target = mct_fx.get_tpc(args.tpc)  # a bad --tpc fails before the model is built
    model = load_model(args.model, args.weights)
    budget = None
    if args.weights_memory is not None:
        w = args.weights_memory
        budget = mct_fx.ResourceUtilization(weights_memory=w * float_weights_memory(model) if w <= 1 else w)
    start = time.time()
    loader = calibration_loader(args.calib, args.n_calib, args.batch_size, _input_shape(args, model), model, args)
    calib_seconds = time.time() - start
    start = time.time()
    config = mct_fx.QuantConfig(log_dir=args.log_dir, optq=mct_fx.OPTQConfig() if args.optq else None)
    qmodel = mct_fx.quantize(model, loader, target, config, target=budget, verbose=not args.quiet)
    return model, loader, qmodel, target, calib_seconds, time.time() - start


def _report(args: argparse.Namespace) -> int:
    import mct_fx

    model, loader, qmodel, _, _, seconds = _build(args)
    print(f"quantized in {seconds:.1f} s; troubleshooting on the calibration data\n")
    report = mct_fx.troubleshoot(model, qmodel, loader, mct_fx.TroubleshootConfig(sqnr_db=args.sqnr_db),
                                 verify=args.verify, verbose=True)
    json_path, html_path = report.write(args.out)
    print(f"\nwrote {json_path}, {html_path}")
    return 0


def _quantize(args: argparse.Namespace) -> int:
    import mct_fx
    from mct_fx.export import export_onnx
    from mct_fx.resources import float_weights_memory

    if args.convert and args.format != "imx500":
        raise CLIError("--convert runs the IMX500 converter: add --format imx500")
    if args.convert:
        from mct_fx.convert_imx500 import find_converter

        find_converter(args.converter)  # a missing converter fails before the work
    model, loader, qmodel, target, calib_seconds, seconds = _build(args)
    out = Path(args.out)  # created once quantization succeeded: no half-done output folder
    example = loader if isinstance(loader, torch.Tensor) else next(iter(loader))
    example = example[0] if isinstance(example, (list, tuple)) else example
    package = None
    if args.format == "imx500":
        from mct_fx.export_imx500 import export_imx500

        export = export_imx500(qmodel, example[:1], out / "model.onnx")
        if args.convert:
            from mct_fx.convert_imx500 import convert_imx500

            package = convert_imx500(export.path, out / "imx500", args.converter)
    else:
        export = export_onnx(qmodel, example[:8], out / "model.onnx", opset=args.opset,
                             weights_dtype=args.onnx_weights)
    torch.save({"state_dict": qmodel.state_dict(), "model": args.model, "weights": args.weights,
                "tpc": target.name}, out / "quantized_state.pt")
    summary = mct_fx.summary(qmodel)
    float_bytes, quant_bytes = float_weights_memory(qmodel), mct_fx.resource_utilization(qmodel).weights_memory
    report = {
        "model": args.model, "weights": args.weights, "tpc": target.name, "calibration": args.calib,
        "n_calib": args.n_calib, "calibration_seconds": round(calib_seconds, 2),
        "quantize_seconds": round(seconds, 2),
        "weights_bytes": {"float": float_bytes, "quantized": quant_bytes},
        "onnx": _export_report(export), "imx500": None if package is None else _package_report(package),
        "layers": [asdict(layer) for layer in summary.layers],
        "left_float": list(summary.unknown),
    }
    if summary.mixed_precision is not None:
        mp = summary.mixed_precision
        report["mixed_precision"] = {"target": dict(mp.target.items()), "achieved": dict(mp.utilization.items()),
                                     "bits": mp.bits, "seconds": round(mp.seconds, 2)}
    (out / "report.json").write_text(json.dumps(report, indent=2))
    print(summary)
    if args.calib == "synthetic":
        print(f"\ngenerated {args.n_calib} calibration images from the BatchNorm statistics in {calib_seconds:.1f} s")
    print(f"\nquantized in {seconds:.1f} s; weights {float_bytes / 1e6:.2f} MB float -> "
          f"{quant_bytes / 1e6:.2f} MB quantized")
    if package is not None:
        print(f"IMX500 package {package.package} ({package.seconds:.0f} s to convert): memory {package.memory}")
    print(f"wrote {out / 'model.onnx'} ({args.format}), {out / 'quantized_state.pt'}, {out / 'report.json'}")
    return 0


def _export_report(export) -> dict:
    from mct_fx.export_imx500 import Imx500ExportResult

    if isinstance(export, Imx500ExportResult):
        report = {"path": str(export.path), "opset": export.opset, "format": "imx500", **export.quantizers}
    else:
        report = {"path": str(export.path), "opset": export.opset, "format": "qdq",
                  "QuantizeLinear": export.n_quantize, "DequantizeLinear": export.n_dequantize}
    if export.agreement is not None:
        report["agreement_with_graph_module"] = asdict(export.agreement)
    return report


def _package_report(package) -> dict:
    m = package.memory
    return {"package": str(package.package), "convert_seconds": round(package.seconds, 1), "fits": m.fits,
            "memory_bytes": m.used_bytes, "chip_bytes": m.available_bytes, "share": round(m.share, 4)}


# ------------------------------------------------------------------ tpc


def _tpc(args: argparse.Namespace) -> int:
    from mct_fx.tpc import BUILTIN_TPCS, get_tpc, tpc_to_dict

    if args.tpc_command == "list":
        width = max(map(len, BUILTIN_TPCS))
        for name, factory in BUILTIN_TPCS.items():
            print(f"{name.ljust(width)}  {(factory.__doc__ or '').strip().splitlines()[0]}")
        return 0
    target = get_tpc(args.name)
    if args.json:
        print(json.dumps(tpc_to_dict(target), indent=2))
    else:
        print(describe_tpc(target))
    return 0


def describe_tpc(target) -> str:
    """A readable table of a TPC: per operator set, the base configuration and the candidates."""
    def config(c) -> str:
        act = (f"A{c.activation_n_bits} {c.activation_method.value}" if c.enable_activation_quantization
               else "preserves input grid" if c.quantization_preserving else "no quantizer")
        if c.kernel.enabled:
            act = f"W{c.kernel.n_bits} {c.kernel.method.value}{' per-channel' if c.kernel.per_channel else ''}, {act}"
        return act

    def bits(options) -> str:
        ws = sorted({c.kernel.n_bits for c in options.candidates if c.kernel.enabled}, reverse=True)
        acts = sorted({c.activation_n_bits for c in options.candidates if c.enable_activation_quantization},
                      reverse=True)
        return ", ".join(p for p in (f"W{'/'.join(map(str, ws))}" if ws else "",
                                     f"A{'/'.join(map(str, acts))}" if acts else "") if p)

    rows = [("operator set", "base configuration", "candidates")]
    rows.append(("(default)", config(target.default_options.base), bits(target.default_options)))
    for s in target.operator_sets:
        options = s.options or target.default_options
        rows.append((s.name, config(options.base), bits(options)))
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    lines = [f"{target.name} (version {target.version})", ""]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    if target.fusing_patterns:
        lines += ["", "fused (only the last op's output is quantized):"]
        lines += ["  " + " -> ".join("|".join(g) for g in f.groups) for f in target.fusing_patterns]
    return "\n".join(lines)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
