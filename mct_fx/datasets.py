"""Calibration sources the ``mct-fx`` command reads offline: Fashion-MNIST, an image folder, synthetic.

Each returns a ``torch.utils.data.DataLoader`` of ``(images, labels)`` (labels
are -1 for synthetic data) so it can feed ``mct_fx.quantize`` directly.
"""

from __future__ import annotations

import gzip
import os
from collections.abc import Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset

__all__ = ["DatasetError", "FMNIST_DIR", "read_idx", "fashion_mnist", "fashion_mnist_available",
           "image_folder", "synthetic"]

FMNIST_DIR = os.environ.get("MCT_FX_FMNIST_DIR", "/usr/share/datasets/fashion-mnist")
_FMNIST_HINT = "install it with: apt-get install -y dataset-fashion-mnist (or set MCT_FX_FMNIST_DIR)"
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class DatasetError(FileNotFoundError):
    """A dataset is missing or unreadable; the message says where it was looked for and how to get it."""


def read_idx(path: str) -> np.ndarray:
    """An IDX file (the MNIST format, optionally gzipped) as a uint8 array."""
    with gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb") as f:
        data = f.read()
    dims = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(dims))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * dims).reshape(shape)


def fashion_mnist_available(root: str | None = None) -> bool:
    return os.path.exists(os.path.join(root or FMNIST_DIR, "t10k-images-idx3-ubyte.gz"))


def fashion_mnist(split: str = "train", root: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(images [N, 1, 28, 28] float in [0, 1], labels [N] int64)`` of the train or test split."""
    root = root or FMNIST_DIR
    prefix = {"train": "train", "test": "t10k"}[split]
    images_path = os.path.join(root, f"{prefix}-images-idx3-ubyte.gz")
    if not os.path.exists(images_path):
        raise DatasetError(f"Fashion-MNIST not found at {root}; {_FMNIST_HINT}")
    images = torch.from_numpy(read_idx(images_path).copy()).float().div_(255).unsqueeze(1)
    labels = torch.from_numpy(read_idx(os.path.join(root, f"{prefix}-labels-idx1-ubyte.gz")).copy()).long()
    return images, labels


def image_folder(path: str, n: int, image_size: int = 224, batch_size: int = 32,
                 mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD) -> DataLoader:
    """``n`` images of an ``ImageFolder`` tree (class sub-folders), resized, centre-cropped and normalized
    the torchvision way (shuffled with a fixed seed, so any ``n`` covers the classes)."""
    from torchvision import datasets, transforms

    if not os.path.isdir(path):
        raise DatasetError(f"image folder {path!r} does not exist")
    tf = transforms.Compose([transforms.Resize(int(image_size * 256 / 224)), transforms.CenterCrop(image_size),
                             transforms.ToTensor(), transforms.Normalize(mean, std)])
    try:
        ds = datasets.ImageFolder(path, transform=tf)
    except (FileNotFoundError, RuntimeError) as e:
        raise DatasetError(f"image folder {path!r}: {e}") from None
    order = torch.randperm(len(ds), generator=torch.Generator().manual_seed(0))[:n].tolist()
    return DataLoader(torch.utils.data.Subset(ds, order), batch_size=batch_size)


def synthetic(shape: Sequence[int], n: int, batch_size: int = 32, seed: int = 0) -> DataLoader:
    """``n`` standard-normal inputs of ``shape`` (per sample): for a smoke run, not for accuracy."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, *shape, generator=g)
    return DataLoader(TensorDataset(x, torch.full((n,), -1)), batch_size=batch_size)
