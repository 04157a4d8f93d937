"""Ablation of the PTQ corrections: each switch of ``QuantConfig`` flipped on its own, at W8A8 and W4A8.

    python benchmarks/ablation.py [--models fmnist_resnet,fmnist_mobilenet,mobilenet_v2] [--n-calib 512]

Same models, calibration and evaluation images as ``compare.py`` (and its
headline metric: test accuracy on Fashion-MNIST, top-1 agreement with float on
the ImageNet crops), all in this process: only quality is measured here, not
time.  Each row flips one switch against the defaults (a default-on correction
turned off, a default-off one turned on); "LUT weights" swaps the 4-bit uniform
kernels for k-means tables (``imx500_lut``).  Writes
``benchmarks/results/ablation.{md,json}``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import compare  # noqa: E402

import mct_fx  # noqa: E402
from mct_fx.tpc.derive import with_bits  # noqa: E402

VARIANTS: dict[str, dict] = {
    "defaults": {},
    "- bias correction": {"weights_bias_correction": False},
    "- shift-negative correction": {"shift_negative_correction": False},
    "- linear & residual collapsing": {"linear_collapsing": False, "residual_collapsing": False},
    "+ second-moment correction": {"weights_second_moment_correction": True},
    "- second-moment auto (bias correction only)": {"weights_second_moment_correction": False},
    "+ shift-negative param search": {"shift_negative_params_search": True},
    "- z-threshold (inf)": {"z_threshold": math.inf},
    "- ReLU bound to power of two": {"relu_bound_to_power_of_2": False},
    "- power-of-two alignment": {"power_of_two_alignment": False},
    "+ activation channel equalization": {"activation_channel_equalization": True},
    "+ softmax shift": {"softmax_shift": True},
    "+ concat threshold unification": {"concat_threshold_update": True},
    "+ all of the above": {"weights_second_moment_correction": True, "shift_negative_params_search": True,
                           "activation_channel_equalization": True, "softmax_shift": True},
}
TARGETS = {"W8A8": lambda: mct_fx.get_tpc("imx500"),
           "W4A8": lambda: with_bits(mct_fx.get_tpc("imx500"), weights=4),
           "W4A8 LUT": lambda: with_bits(mct_fx.get_tpc("imx500_lut"), weights=4)}


def run_model(name: str, n_calib: int, variants: dict[str, dict] = VARIANTS) -> dict:
    spec, data, labels = (compare._mobilenet_job(n_calib) if name == "mobilenet_v2"
                          else compare._fmnist_job(name, n_calib))
    model = compare._build(spec)

    def logits(m) -> dict:
        with torch.no_grad():
            return {k: torch.cat([m(b) for b in compare._batches(x, 100)]).float() for k, x in data["eval"].items()}

    float_logits = logits(model)
    calib = compare._batches(data["calib"])
    rows = {}
    for bits, target in TARGETS.items():
        if bits == "W4A8 LUT" and variants is not VARIANTS:
            continue
        for label, switches in (variants if bits != "W4A8 LUT" else {"defaults": {}}).items():
            start = time.perf_counter()
            qmodel = mct_fx.quantize(model, calib, target(), mct_fx.QuantConfig(**switches), verbose=False)
            seconds = time.perf_counter() - start
            quality = compare._quality(logits(qmodel), float_logits, labels)
            rows.setdefault(label if bits != "W4A8 LUT" else "LUT weights (k-means)", {})[bits[:4]] = {
                **quality, "seconds": seconds}
            print(f"{name} {bits} {label}: {quality} ({seconds:.1f} s)", flush=True)
    return {"model": name, "n_calib": len(data["calib"]),
            "float": compare._quality(float_logits, float_logits, labels), "rows": rows}


def table(result: dict) -> str:
    key, label = compare._headline(result)
    ev = compare._evaluation_set(result)
    ref = result["float"].get(key, 100.0)
    head = ["variant"] + [f"{b} {label}" for b in ("W8A8", "W4A8")] + [f"{b} Δ vs defaults" for b in ("W8A8", "W4A8")]
    head += [f"{b} logit SQNR dB" for b in ("W8A8", "W4A8")]
    base = result["rows"]["defaults"]
    lines = [head, ["float", f"{ref:.2f}", f"{ref:.2f}", "", "", "", ""]]
    for variant, by_bits in result["rows"].items():
        row = [variant]
        row += [f"{by_bits[b][key]:.2f}" if b in by_bits else "" for b in ("W8A8", "W4A8")]
        row += [f"{by_bits[b][key] - base[b][key]:+.2f}" if b in by_bits and variant != "defaults" else ""
                for b in ("W8A8", "W4A8")]
        row += [f"{by_bits[b][ev + '_sqnr_db']:.2f}" if b in by_bits else "" for b in ("W8A8", "W4A8")]
        lines.append(row)
    text = ["| " + " | ".join(r) + " |" for r in lines]
    text.insert(1, "|" + "|".join("---" for _ in head) + "|")
    return f"### {result['model']} ({result['n_calib']} calibration images)\n\n" + "\n".join(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="fmnist_resnet,fmnist_mobilenet,mobilenet_v2")
    parser.add_argument("--n-calib", type=int, default=512)
    parser.add_argument("--variants", help="comma-separated row labels (default: all; 'defaults' always runs)")
    parser.add_argument("--out", default=compare.RESULTS)
    args = parser.parse_args()
    variants = VARIANTS
    if args.variants:
        wanted = {"defaults", *(v.strip() for v in args.variants.split(","))}
        unknown = wanted - set(VARIANTS)
        if unknown:
            parser.error(f"unknown variants {sorted(unknown)}; choose from {list(VARIANTS)}")
        variants = {k: v for k, v in VARIANTS.items() if k in wanted}
    results, sections = [], ["Command: `python benchmarks/ablation.py` (quality only; one run each, "
                             "deterministic given the seeds)."]
    for name in [m.strip() for m in args.models.split(",")]:
        result = run_model(name, args.n_calib, variants)
        results.append(result)
        sections.append(table(result))
        print(sections[-1] + "\n", flush=True)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "ablation.md"), "w") as f:
        f.write("\n\n".join(sections) + "\n")
    with open(os.path.join(args.out, "ablation.json"), "w") as f:
        json.dump(results, f, indent=2)
    print(f"wrote {os.path.join(args.out, 'ablation.md')} and ablation.json")


if __name__ == "__main__":
    main()
