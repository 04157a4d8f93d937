"""Wall time of PTQ: mct_fx vs Sony MCT, ResNet-18, 512 calibration images at 224x224 (CPU).

    python benchmarks/ptq_time.py --mct-python /path/to/mct-venv/bin/python [--images 512 --side 224]

Both tools get the same model (random weights, BN statistics re-estimated) and
the same images (``benchmarks/zoo.py``), in batches of 32; the table prints
seconds for ``quantize`` only and the ratio.
"""

from __future__ import annotations

import argparse
import os

import torch

import peers
import zoo


def work(tool: str, images: str, side: str, model: str = "resnet18") -> dict:
    import torchvision

    n, side = int(images), int(side)
    torch.manual_seed(0)
    net = torchvision.models.get_model(model, weights=None)
    zoo.reestimate_bn(net, side, batches=2)
    calib = [zoo.images(32, side, 100 + i) for i in range(n // 32)]
    q, seconds = peers.quantize_with(tool, net.eval(), calib)
    x = zoo.images(8, side, 999)
    with torch.no_grad():
        sqnr = zoo.sqnr_db(net(x), q(x))
    return {"seconds": seconds, "sqnr_db": sqnr, "threads": torch.get_num_threads()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mct-python", default=os.environ.get("MCT_PYTHON"))
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--side", type=int, default=224)
    parser.add_argument("--model", default="resnet18")
    args = parser.parse_args()
    job = [str(args.images), str(args.side), args.model]
    ours = peers.run_worker("mct_fx", "ptq_time", job)
    theirs = peers.run_worker("mct", "ptq_time", job, args.mct_python)
    print(f"PTQ wall time, {args.model}, {args.images} images {args.side}x{args.side}, "
          f"CPU threads {ours.get('threads')}")
    print(f"{'tool':8s} {'seconds':>8s} {'SQNR dB':>8s}")
    for name, r in (("mct_fx", ours), ("MCT", theirs)):
        if r is None:
            print(f"{name:8s} {'(no --mct-python)':>17s}")
        elif "error" in r:
            print(f"{name:8s} failed: {r['error']}")
        else:
            print(f"{name:8s} {r['seconds']:8.1f} {r['sqnr_db']:8.2f}")
    if ours and theirs and "seconds" in ours and "seconds" in theirs:
        print(f"MCT / mct_fx time ratio: {theirs['seconds'] / ours['seconds']:.1f}x")


if __name__ == "__main__":
    main()
