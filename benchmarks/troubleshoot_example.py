"""The troubleshooting guide's example (docs/troubleshooting.md): MobileNetV2 (ImageNet weights) at W8A8.

    python benchmarks/troubleshoot_example.py [--out DIR]

Quantizes torchvision's MobileNetV2 for imx500 on photo crops (benchmarks/assets.py),
runs ``mct_fx.troubleshoot(..., verify=True)`` (each suggested setting tried and measured)
and writes its report, then prints the output SQNR and top-1 agreement with the float
model on held-out crops for the default, each setting the report names, and GPTQ.
"""

from __future__ import annotations

import argparse
import time

import torch
import torchvision

import mct_fx
import mct_fx.report
from mct_fx.troubleshoot_verify import apply_change

import assets


def _agreement(model: torch.nn.Module, q: torch.nn.Module, images: torch.Tensor) -> float:
    with torch.no_grad():
        same = [(model(b).argmax(1) == q(b).argmax(1)).float() for b in images.split(64)]
    return float(torch.cat(same).mean()) * 100


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="troubleshoot_mnv2", help="where report.json / report.html go")
    parser.add_argument("--n-calib", type=int, default=256)
    parser.add_argument("--n-eval", type=int, default=256)
    args = parser.parse_args()
    torch.manual_seed(0)
    calib, evaluation = assets.imagenet_fidelity_sets(args.n_calib, args.n_eval)
    model = torchvision.models.mobilenet_v2(weights=None)
    model.load_state_dict(torch.load(assets.mobilenet_v2_weights(), weights_only=True))
    model.eval()

    start = time.time()
    q = mct_fx.quantize(model, calib, "imx500", verbose=False)
    print(f"PTQ W8A8 in {time.time() - start:.0f} s")
    start = time.time()
    report = mct_fx.troubleshoot(model, q, calib, validation=evaluation[:64], out_dir=args.out, verify=True)
    print(f"troubleshoot (verify=True) in {time.time() - start:.0f} s; wrote {args.out}/report.json and "
          "report.html\n")
    print("\n".join(str(report.comparison).splitlines()[:12]), "\n")

    # the settings again on held-out crops, with top-1 agreement, and GPTQ
    print(f"verified: the unchanged settings quantized again give {report.verify_baseline:.2f} dB")
    verified = [f for f in report.findings if f.measured is not None]
    best = max(verified, key=lambda f: f.measured, default=None)
    clipped = [f.node for f in report.findings if f.cause == "clipping"]
    settings = {
        "z_threshold=inf ('clipping')": mct_fx.QuantConfig(z_threshold=float("inf")),
        f"noclipping on the {len(clipped)} 'clipping' layers": mct_fx.QuantConfig(overrides=tuple(
            mct_fx.LayerOverride(name=node, activation_error_method="noclipping") for node in clipped)),
        "activation_channel_equalization=True": mct_fx.QuantConfig(activation_channel_equalization=True),
        "z_threshold=8": mct_fx.QuantConfig(z_threshold=8.0),
        "weights_error_method='hmse'": mct_fx.QuantConfig(weights_error_method="hmse"),
    }
    if best is not None:
        settings[f"best verified: {best.change}"] = apply_change(mct_fx.QuantConfig(), best.change)
    print(f"{'model':60s} {'output SQNR (dB)':>16s} {'top-1 agreement (%)':>20s}")
    rows = [("default (the report above)", lambda: q)]
    rows += [(name, lambda c=c: mct_fx.quantize(model, calib, "imx500", c, verbose=False))
             for name, c in settings.items()]
    rows.append(("mct_fx.gptq, 2 epochs ('unexplained')",
                 lambda: mct_fx.gptq(model, calib, "imx500", mct_fx.GPTQConfig(epochs=2), verbose=False)))
    for name, build in rows:
        candidate = build()
        sqnr = mct_fx.report.output_sqnr(model, candidate, evaluation)
        print(f"{name:60s} {sqnr:16.2f} {_agreement(model, candidate, evaluation):20.1f}", flush=True)


if __name__ == "__main__":
    main()
