"""Offline evaluation assets: find them, never download them.

Fashion-MNIST comes from the Debian package ``dataset-fashion-mnist`` (IDX files
under ``/usr/share/datasets/fashion-mnist/``).
"""

from __future__ import annotations

import gzip
import os

import numpy as np
import torch

FMNIST_DIR = os.environ.get("MCT_FX_FMNIST_DIR", "/usr/share/datasets/fashion-mnist")
FMNIST_HINT = "install it with: apt-get install -y dataset-fashion-mnist (or set MCT_FX_FMNIST_DIR)"


class MissingAsset(FileNotFoundError):
    """An evaluation asset is not installed; the message says how to install it."""


def _idx(path: str) -> np.ndarray:
    with gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb") as f:
        data = f.read()
    dims = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(dims))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * dims).reshape(shape)


def fashion_mnist_available() -> bool:
    return os.path.exists(os.path.join(FMNIST_DIR, "t10k-images-idx3-ubyte.gz"))


def fashion_mnist(split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
    """``(images [N, 1, 28, 28] float in [0, 1], labels [N] int64)`` of the train or test split."""
    prefix = {"train": "train", "test": "t10k"}[split]
    images_path = os.path.join(FMNIST_DIR, f"{prefix}-images-idx3-ubyte.gz")
    if not os.path.exists(images_path):
        raise MissingAsset(f"Fashion-MNIST not found at {FMNIST_DIR}; {FMNIST_HINT}")
    images = torch.from_numpy(_idx(images_path).copy()).float().div_(255).unsqueeze(1)
    labels = torch.from_numpy(_idx(os.path.join(FMNIST_DIR, f"{prefix}-labels-idx1-ubyte.gz")).copy()).long()
    return images, labels
