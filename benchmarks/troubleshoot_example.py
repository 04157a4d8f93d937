"""The troubleshooting guide's example (docs/troubleshooting.md): MobileNetV2 (ImageNet weights) at W8A8.

    python benchmarks/troubleshoot_example.py [--out DIR]

Quantizes torchvision's MobileNetV2 for imx500 on photo crops (benchmarks/assets.py),
runs ``mct_fx.troubleshoot(..., verify=True)`` (each suggested setting tried and measured)
and writes its report, then prints the output SQNR and top-1 agreement with the float
model on held-out crops for the default, the best verified setting and GPTQ.
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

    # the knobs again, on held-out crops and with top-1 agreement: the best verified one, and GPTQ
    print(f"verified: the unchanged settings quantized again give {report.verify_baseline:.2f} dB")
    verified = [f for f in report.findings if f.measured is not None]
    best = max(verified, key=lambda f: f.measured, default=None)
    trials = {"default (the report above)": q}
    if best is not None:
        trials[f"best verified knob: {best.change}"] = mct_fx.quantize(
            model, calib, "imx500", apply_change(mct_fx.QuantConfig(), best.change), verbose=False)
    trials["mct_fx.gptq, 2 epochs ('unexplained')"] = mct_fx.gptq(model, calib, "imx500",
                                                                   mct_fx.GPTQConfig(epochs=2), verbose=False)
    print(f"{'model':60s} {'output SQNR (dB)':>16s} {'top-1 agreement (%)':>20s}")
    for name, candidate in trials.items():
        sqnr = mct_fx.report.output_sqnr(model, candidate, evaluation)
        print(f"{name:60s} {sqnr:16.2f} {_agreement(model, candidate, evaluation):20.1f}", flush=True)


if __name__ == "__main__":
    main()
