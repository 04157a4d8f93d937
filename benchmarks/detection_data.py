"""Fashion-MNIST mosaics for object detection: generated offline, seeded.

A canvas is ``SIZE x SIZE`` grey pixels: a smooth random texture plus pixel noise as background,
and 1-6 garments, each rescaled to a side of 22-64 px and placed at a position, both drawn as real
numbers (the garment is resampled onto the canvas grid), dimmed at random, so that no two boxes
overlap by more than ``MAX_IOU``. A garment's box is tight around its source pixels brighter than
``INK``, mapped onto the canvas: real-valued corners, as a real data set's boxes are once its images
are resized to the network input (boxes on whole pixels would favour a tool whose box outputs are
rounded to whole pixels). Labels are the 10 Fashion-MNIST classes. Training canvases draw their
garments from the training split, test canvases from the test split.

Plain torch (no mct_fx), so that a peer's venv can import it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torchvision.ops import box_iou

__all__ = ["SIZE", "CLASSES", "mosaics", "Mosaics"]

SIZE, CLASSES = 160, 10
MAX_ITEMS, MIN_SIDE, MAX_SIDE, MAX_IOU, INK = 6, 22, 64, 0.15, 0.15


def _background(g: torch.Generator) -> torch.Tensor:
    """Low-frequency texture (random 5x5 and 20x20 fields, upsampled) plus pixel noise, in about [0, 0.45]."""
    coarse = F.interpolate(torch.rand(1, 1, 5, 5, generator=g), SIZE, mode="bicubic", align_corners=False)
    fine = F.interpolate(torch.rand(1, 1, 20, 20, generator=g), SIZE, mode="bilinear", align_corners=False)
    level = torch.rand(3, generator=g)
    texture = 0.25 * level[0] * coarse + 0.12 * level[1] * fine
    noise = (0.02 + 0.05 * level[2]) * torch.randn(1, 1, SIZE, SIZE, generator=g)
    return (texture + noise)[0]


def _item(image: torch.Tensor, side: float, x0: float, y0: float) -> tuple[torch.Tensor, slice, slice, torch.Tensor]:
    """The garment scaled to ``side`` px with its top-left corner at (``x0``, ``y0``): its pixels on the
    canvas grid (bilinear resampling at the pixel centres), the rows and columns they cover, and its box
    (x0, y0, x1, y1): the tight box of the source pixels above ``INK``, mapped onto the canvas."""
    src = image.shape[-1]
    cols = slice(int(x0), min(SIZE, int(x0 + side) + 1))
    rows = slice(int(y0), min(SIZE, int(y0 + side) + 1))
    u = (torch.arange(cols.start, cols.stop) + 0.5 - x0) / side * 2 - 1  # normalized source coordinates
    v = (torch.arange(rows.start, rows.stop) + 0.5 - y0) / side * 2 - 1
    grid = torch.stack(torch.meshgrid(u, v, indexing="xy"), -1)[None]
    patch = F.grid_sample(image[None], grid, mode="bilinear", padding_mode="zeros", align_corners=False)[0]
    ys, xs = torch.nonzero(image[0] > INK, as_tuple=True)
    scale = side / src
    box = torch.tensor([x0 + scale * float(xs.min()), y0 + scale * float(ys.min()),
                        x0 + scale * float(xs.max() + 1), y0 + scale * float(ys.max() + 1)])
    return patch.clamp(0, 1), rows, cols, box


def _canvas(images: torch.Tensor, labels: torch.Tensor, g: torch.Generator) -> tuple[torch.Tensor, dict]:
    canvas = _background(g)
    boxes, classes = [], []
    for _ in range(int(torch.randint(1, MAX_ITEMS + 1, (1,), generator=g))):
        for _try in range(20):
            k = int(torch.randint(len(images), (1,), generator=g))
            side, fx, fy = torch.rand(3, generator=g).tolist()
            side = MIN_SIDE + (MAX_SIDE - MIN_SIDE) * side
            x0, y0 = (SIZE - side) * fx, (SIZE - side) * fy
            patch, rows, cols, box = _item(images[k], side, x0, y0)
            if not boxes or float(box_iou(box[None], torch.stack(boxes)).max()) <= MAX_IOU:
                break
        else:
            continue
        contrast = 0.55 + 0.45 * float(torch.rand(1, generator=g))
        canvas[:, rows, cols] = torch.maximum(canvas[:, rows, cols], patch * contrast)
        boxes.append(box)
        classes.append(int(labels[k]))
    target = {"boxes": torch.stack(boxes), "labels": torch.tensor(classes, dtype=torch.int64)}
    return canvas.clamp(0, 1), target


class Mosaics:
    """``n`` canvases (``images`` [n, 1, SIZE, SIZE] in [0, 1]) and their targets (``boxes`` [k, 4]
    real-valued corners in pixels, ``labels`` [k]), as torchmetrics' mean average precision takes them."""

    def __init__(self, images: torch.Tensor, targets: list[dict]):
        self.images, self.targets = images, targets

    def __len__(self) -> int:
        return len(self.images)

    def batches(self, batch_size: int) -> list[torch.Tensor]:
        return [self.images[i:i + batch_size] for i in range(0, len(self), batch_size)]


def mosaics(split: str, n: int, seed: int, source: tuple[torch.Tensor, torch.Tensor] | None = None) -> Mosaics:
    """``n`` seeded canvases whose garments come from Fashion-MNIST's ``split`` (or ``source``)."""
    if source is None:
        from assets import fashion_mnist

        source = fashion_mnist(split)
    images, labels = source
    g = torch.Generator().manual_seed(seed)
    canvases, targets = zip(*(_canvas(images, labels, g) for _ in range(n)), strict=True)
    return Mosaics(torch.stack(canvases), list(targets))
