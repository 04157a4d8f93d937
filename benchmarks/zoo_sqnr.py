"""W8A8 output SQNR on the random-weight torchvision zoo, for mct_fx or Sony MCT.

    python benchmarks/zoo_sqnr.py --tool mct_fx [--models resnet18,...]
    /path/to/mct-venv/bin/python benchmarks/zoo_sqnr.py --tool mct

Both read the same models and data from ``benchmarks/zoo.py`` and print a
table (name, SQNR dB, seconds); ``--json`` writes the numbers too.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import zoo  # noqa: E402


def run_mct_fx(model, calib):
    import mct_fx

    return mct_fx.quantize(model, calib, "imx500", verbose=False)


def run_mct(model, calib):
    import model_compression_toolkit as mct

    tpc = mct.get_target_platform_capabilities(tpc_version="1.0", device_type="imx500")

    def gen():
        for x in calib:
            yield [x]

    qmodel, _ = mct.ptq.pytorch_post_training_quantization(model, gen, target_platform_capabilities=tpc)
    return qmodel


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tool", choices=["mct_fx", "mct"], default="mct_fx")
    parser.add_argument("--models", default=",".join(zoo.SQNR_ZOO))
    parser.add_argument("--json", help="write {model: sqnr_db} here")
    args = parser.parse_args()
    runner = run_mct_fx if args.tool == "mct_fx" else run_mct
    results = {}
    print(f"{'model':22s} {'SQNR dB':>8s} {'seconds':>8s}")
    for name in args.models.split(","):
        model, side = zoo.build(name)
        calib, x = zoo.calibration(side), zoo.evaluation(side)
        with torch.no_grad():
            ref = model(x)
        t0 = time.perf_counter()
        qmodel = runner(model, calib)
        seconds = time.perf_counter() - t0
        with torch.no_grad():
            out = qmodel(x)
        results[name] = round(zoo.sqnr_db(ref, out), 2)
        print(f"{name:22s} {results[name]:8.2f} {seconds:8.1f}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
