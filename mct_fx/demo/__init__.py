"""The embedded demo: a compact CNN trained on Fashion-MNIST, shipped with a few hundred images.

Nothing is downloaded: ``fmnist_cnn.pt`` (the weights) and ``fmnist_samples.npz``
(256 training images for calibration, 500 test images with labels) are package
data, rebuilt by ``python benchmarks/train_demo.py``.
"""

from __future__ import annotations

from collections import OrderedDict
from importlib import resources

import numpy as np
import torch
from torch import Tensor, nn

__all__ = ["DemoNet", "CLASSES", "load_model", "load_samples"]

CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
WEIGHTS, SAMPLES = "fmnist_cnn.pt", "fmnist_samples.npz"


_BLOCKS = ((1, 24, 1), (24, 32, 2), (32, 48, 1), (48, 64, 2), (64, 96, 1))  # in, out, stride


class DemoNet(nn.Sequential):
    """Five conv-BN-ReLU blocks, global pooling and a classifier (about 100k parameters).

    Input: ``[N, 1, 28, 28]`` grey images in ``[0, 1]``; output: 10 logits.
    """

    input_shape = (1, 28, 28)

    def __init__(self):
        layers = OrderedDict()
        for i, (cin, cout, stride) in enumerate(_BLOCKS, 1):
            layers[f"conv{i}"] = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
            layers[f"bn{i}"] = nn.BatchNorm2d(cout)
            layers[f"relu{i}"] = nn.ReLU()
        layers.update(pool=nn.AdaptiveAvgPool2d(1), flatten=nn.Flatten(), dropout=nn.Dropout(0.1),
                      fc=nn.Linear(96, 10))
        super().__init__(layers)


def load_model() -> DemoNet:
    """The trained demo model (eval mode)."""
    model = DemoNet()
    with resources.files(__name__).joinpath(WEIGHTS).open("rb") as f:
        model.load_state_dict(torch.load(f, weights_only=True))
    return model.eval()


def load_samples() -> tuple[Tensor, Tensor, Tensor]:
    """``(calibration images, test images, test labels)``; images ``[N, 1, 28, 28]`` float in ``[0, 1]``."""
    with resources.files(__name__).joinpath(SAMPLES).open("rb") as f:
        data = np.load(f)
        calib, test, labels = data["calib_images"], data["test_images"], data["test_labels"]

    def images(a: np.ndarray) -> Tensor:
        return torch.from_numpy(a.astype(np.float32) / 255).unsqueeze(1)

    return images(calib), images(test), torch.from_numpy(labels.astype(np.int64))
