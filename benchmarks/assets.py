"""Offline evaluation assets: find them, never download them.

Fashion-MNIST comes from the Debian package ``dataset-fashion-mnist`` (IDX files
under ``/usr/share/datasets/fashion-mnist/``); the readers live in ``mct_fx.datasets``.
"""

from mct_fx.datasets import DatasetError as MissingAsset
from mct_fx.datasets import fashion_mnist, fashion_mnist_available

__all__ = ["MissingAsset", "fashion_mnist", "fashion_mnist_available"]
