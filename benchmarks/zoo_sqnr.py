"""W8A8 (IMX500) output SQNR on the random-weight torchvision zoo: mct_fx vs Sony MCT.

    python benchmarks/zoo_sqnr.py [--models resnet18,...] [--seeds 0,1,2] [--mct-python PATH] [--json out.json]

Both tools see exactly the same models, calibration batches and evaluation
batch (``benchmarks/zoo.py``); each seed is a different random model.  The
table prints SQNR per seed and the mean, and the mean difference.  These
random-weight networks are chaotic: two quantizers of equal quality differ by
a few tenths of a dB per seed, so compare means over seeds.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch

import peers
import zoo


def work(tool: str, models: str, seeds: str) -> dict:
    out: dict = {}
    for name in models.split(","):
        for seed in (int(s) for s in seeds.split(",")):
            model, side = zoo.build(name, seed)
            calib, x = zoo.calibration(side), zoo.evaluation(side)
            with torch.no_grad():
                ref = model(x)
            try:
                t0 = time.perf_counter()
                q, _ = peers.quantize_with(tool, model, calib)
                seconds = time.perf_counter() - t0
                with torch.no_grad():
                    out.setdefault(name, {})[str(seed)] = [zoo.sqnr_db(ref, q(x)), seconds]
            except Exception as e:  # noqa: BLE001 - a peer that cannot quantize a model is a result too
                out.setdefault(name, {})[str(seed)] = [None, repr(e)[:200]]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join(zoo.SQNR_ZOO))
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--mct-python", default=os.environ.get("MCT_PYTHON"))
    parser.add_argument("--json")
    args = parser.parse_args()
    results = {"mct_fx": peers.run_worker("mct_fx", "zoo_sqnr", [args.models, args.seeds])}
    results["mct"] = peers.run_worker("mct", "zoo_sqnr", [args.models, args.seeds], args.mct_python)
    seeds = args.seeds.split(",")
    print(f"{'model':20s} {'tool':7s} " + " ".join(f"{'seed ' + s:>8s}" for s in seeds) + f" {'mean':>7s}")
    for name in args.models.split(","):
        means = {}
        for tool in ("mct_fx", "mct"):
            r = (results[tool] or {}).get(name)
            if r is None:
                continue
            vals = [r[s][0] for s in seeds]
            cells = " ".join(f"{v:8.2f}" if v is not None else f"{'fail':>8s}" for v in vals)
            ok = [v for v in vals if v is not None]
            means[tool] = statistics.mean(ok) if len(ok) == len(vals) else None
            mean = f"{means[tool]:7.2f}" if means[tool] is not None else f"{'-':>7s}"
            print(f"{name:20s} {tool:7s} {cells} {mean}")
        if means.get("mct_fx") is not None and means.get("mct") is not None:
            print(f"{'':20s} {'diff':7s} {'':{9 * len(seeds) - 1}s} {means['mct_fx'] - means['mct']:+7.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
