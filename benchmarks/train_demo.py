"""Train the embedded demo model (``mct_fx.demo.DemoNet``) on Fashion-MNIST and write its package data.

Writes ``mct_fx/demo/fmnist_cnn.pt`` and ``mct_fx/demo/fmnist_samples.npz`` (256
training images for calibration, the first 500 test images with labels).
Needs ``apt-get install -y dataset-fashion-mnist``.  About 3 minutes on 2 cores:

    python benchmarks/train_demo.py [--epochs 4]
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
import torch
from torch import nn

from mct_fx.datasets import fashion_mnist
from mct_fx.demo import SAMPLES, WEIGHTS, DemoNet

OUT = os.path.join(os.path.dirname(__file__), "..", "mct_fx", "demo")


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float(torch.cat([model(x[i:i + 1000]).argmax(1) for i in range(0, len(x), 1000)]).eq(y).float().mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=4)
    args = parser.parse_args()
    torch.manual_seed(0)
    x, y = fashion_mnist("train")
    xt, yt = fashion_mnist("test")
    model = DemoNet()
    steps = args.epochs * ((len(x) + 127) // 128)
    opt = torch.optim.AdamW(model.parameters(), 3e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 3e-3, total_steps=steps)
    start = time.time()
    for epoch in range(args.epochs):
        model.train()
        perm = torch.randperm(len(x))
        for i in range(0, len(x), 128):
            idx = perm[i:i + 128]
            xb = x[idx]
            xb = torch.where(torch.rand(len(xb), 1, 1, 1) < 0.5, xb, xb.flip(-1))  # horizontal flips
            loss = nn.functional.cross_entropy(model(xb), y[idx], label_smoothing=0.05)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        model.eval()
        print(f"epoch {epoch + 1}: test accuracy {accuracy(model, xt, yt):.4f} ({time.time() - start:.0f} s)")
    torch.save(model.state_dict(), os.path.join(OUT, WEIGHTS))
    calib = perm[:256]
    np.savez_compressed(os.path.join(OUT, SAMPLES),
                        calib_images=(x[calib, 0] * 255).round().to(torch.uint8).numpy(),
                        test_images=(xt[:500, 0] * 255).round().to(torch.uint8).numpy(),
                        test_labels=yt[:500].to(torch.uint8).numpy())
    print(f"wrote {WEIGHTS} and {SAMPLES} to {os.path.normpath(OUT)}; "
          f"accuracy on the 500 shipped test images {accuracy(model, xt[:500], yt[:500]):.4f}")


if __name__ == "__main__":
    main()
