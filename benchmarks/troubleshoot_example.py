"""The troubleshooting guide's example (docs/troubleshooting.md): MobileNetV2 (ImageNet weights) at W8A8.

    python benchmarks/troubleshoot_example.py [--out DIR]

Quantizes torchvision's MobileNetV2 for imx500 on photo crops (benchmarks/assets.py),
runs ``mct_fx.troubleshoot`` and writes its report, then tries the knobs the report
suggests one at a time and prints, for each, the output SQNR against the float model
and the top-1 agreement with it on held-out crops.
"""

from __future__ import annotations

import argparse
import math
import time

import torch
import torchvision

import mct_fx

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
    report = mct_fx.troubleshoot(model, q, calib[:64], validation=evaluation[:64], out_dir=args.out)
    print(f"troubleshoot in {time.time() - start:.0f} s; wrote {args.out}/report.json and report.html\n")
    print("\n".join(str(report.comparison).splitlines()[:12]), "\n")

    clipped = [f.node for f in report.findings if f.cause == "clipping"]
    trials = {
        "default (the report above)": mct_fx.QuantConfig(),
        "z_threshold=inf (the 'clipping' knob)": mct_fx.QuantConfig(z_threshold=math.inf),
        f"noclipping on the {len(clipped)} 'clipping' layers": mct_fx.QuantConfig(overrides=tuple(
            mct_fx.LayerOverride(name=node, activation_error_method="noclipping") for node in clipped)),
        "activation_channel_equalization=True ('outlier channel')": mct_fx.QuantConfig(
            activation_channel_equalization=True),
        "z_threshold=8 ('outliers')": mct_fx.QuantConfig(z_threshold=8.0),
    }
    trials["mct_fx.gptq, 2 epochs ('unexplained')"] = None
    print(f"{'knob':60s} {'output SQNR (dB)':>16s} {'top-1 agreement (%)':>20s}")
    for name, config in trials.items():
        try:
            if config is None:
                candidate = mct_fx.gptq(model, calib, "imx500", mct_fx.GPTQConfig(epochs=2), verbose=False)
            else:
                candidate = q if name.startswith("default") else mct_fx.quantize(model, calib, "imx500", config,
                                                                                 verbose=False)
        except ValueError as e:  # e.g. a bit-width the target does not offer for that node
            print(f"{name:60s} not applicable: {e}")
            continue
        sqnr = mct_fx.compare(model, candidate, evaluation[:128], metrics=("sqnr",)).output["sqnr"]
        print(f"{name:60s} {sqnr:16.2f} {_agreement(model, candidate, evaluation):20.1f}", flush=True)


if __name__ == "__main__":
    main()
