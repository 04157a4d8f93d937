"""Train the embedded demo model (``mct_fx.demo.DemoNet``) on Fashion-MNIST and write its package data.

Writes ``mct_fx/demo/fmnist_cnn.pt`` and ``mct_fx/demo/fmnist_samples.npz`` (256
training images for calibration, the first 500 test images with labels), with
the benchmark models' recipe (``train_fmnist.train``).  Needs
``apt-get install -y dataset-fashion-mnist``.  About 5 minutes on 2 cores:

    python benchmarks/train_demo.py [--epochs 4]
"""

from __future__ import annotations

import argparse
import os

import numpy as np
import torch
from train_fmnist import accuracy, train

from mct_fx.demo import SAMPLES, WEIGHTS, DemoNet

import assets

OUT = os.path.join(os.path.dirname(__file__), "..", "mct_fx", "demo")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=4)
    args = parser.parse_args()
    x, y = assets.fashion_mnist("train")
    xt, yt = assets.fashion_mnist("test")
    model = train(DemoNet(), x, y, args.epochs, seed=0, test=(xt, yt))
    torch.save(model.state_dict(), os.path.join(OUT, WEIGHTS))
    calib = torch.randperm(len(x), generator=torch.Generator().manual_seed(1))[:256]
    np.savez_compressed(os.path.join(OUT, SAMPLES),
                        calib_images=(x[calib, 0] * 255).round().to(torch.uint8).numpy(),
                        test_images=(xt[:500, 0] * 255).round().to(torch.uint8).numpy(),
                        test_labels=yt[:500].to(torch.uint8).numpy())
    print(f"wrote {WEIGHTS} and {SAMPLES} to {os.path.normpath(OUT)}; test accuracy "
          f"{accuracy(model, xt, yt):.2f}% (500 shipped images: {accuracy(model, xt[:500], yt[:500]):.2f}%)")


if __name__ == "__main__":
    main()
