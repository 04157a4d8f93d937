"""Quantize a torchvision ResNet-18 for the IMX500 target and compare it with the float model.

Runs offline: random weights (BatchNorm statistics re-estimated) and synthetic
calibration images from ``benchmarks/zoo.py``.  Run: python examples/quickstart.py
"""

import os
import sys

import torch

import mct_fx

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
import zoo  # noqa: E402

side = 64
model, _ = zoo.build("resnet18")
calibration = zoo.calibration(side, n_batches=8, batch_size=16)  # any iterable of batches works
qmodel = mct_fx.quantize(model, calibration, tpc="imx500")

print(mct_fx.summary(qmodel))
x = zoo.evaluation(side)
with torch.no_grad():
    print(f"\noutput SQNR of the W8A8 model vs float: {zoo.sqnr_db(model(x), qmodel(x)):.1f} dB")
print("\nthe quantized program (first lines):\n" + "\n".join(qmodel.code.strip().splitlines()[:8]))
