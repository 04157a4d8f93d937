"""Train the two detection benchmark models on Fashion-MNIST mosaics, seeded, and cache them.

    python benchmarks/train_detection.py [--only yolo] [--force]

Writes ``<cache>/det_yolo.pt`` and ``<cache>/det_ssd.pt`` (state_dict plus float mAP on the test
canvases); the cache is ``$MCT_FX_BENCH_CACHE`` or ``~/.cache/mct_fx/benchmarks``. About 12-15 minutes
per model on 2 CPU cores. Needs ``apt-get install -y dataset-fashion-mnist``.

Losses: YOLO as YOLOv8 trains it (task-aligned assignment, BCE on aligned class targets, CIoU +
distribution-focal box loss); SSD as torchvision's SSD (IoU matching, smooth-L1 codes, cross-entropy
with 3:1 hard negative mining). mAP: torchmetrics' COCO mean average precision.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from detection_data import SIZE, Mosaics, mosaics
from detection_models import CLASSES, DETECTORS, REG_MAX, xy_boxes
from torch import Tensor, nn
from torchvision.models.detection import _utils as det_utils
from torchvision.ops import box_iou, complete_box_iou_loss

CACHE = os.environ.get("MCT_FX_BENCH_CACHE", os.path.expanduser("~/.cache/mct_fx/benchmarks"))
EPOCHS = {"yolo": 8, "ssd": 8}
LR = {"yolo": 2e-3, "ssd": 3e-3}
TRAIN_CANVASES, TEST_CANVASES, BATCH = 6000, 2000, 32
TRAIN_SEED, TEST_SEED = 1, 2


# ---------------------------------------------------------------------------------------------- data

def _padded(targets: list[dict], order: list[int] | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Boxes ``[B, M, 4]``, labels ``[B, M]`` and a validity mask ``[B, M]``, zero-padded to M boxes."""
    m = max(len(t["labels"]) for t in targets)
    boxes, labels, mask = torch.zeros(len(targets), m, 4), torch.zeros(len(targets), m, dtype=torch.long), \
        torch.zeros(len(targets), m, dtype=torch.bool)
    for i, t in enumerate(targets):
        k = len(t["labels"])
        boxes[i, :k] = t["boxes"] if order is None else t["boxes"][:, order]
        labels[i, :k], mask[i, :k] = t["labels"], True
    return boxes, labels, mask


def _flip(x: Tensor, targets: list[dict], g: torch.Generator) -> tuple[Tensor, list[dict]]:
    """Horizontal flips of half the batch (boxes mirrored)."""
    flip = torch.rand(len(x), generator=g) < 0.5
    x = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
    out = []
    for f, t in zip(flip.tolist(), targets, strict=True):
        b = t["boxes"]
        out.append({"boxes": torch.stack([SIZE - b[:, 2], b[:, 1], SIZE - b[:, 0], b[:, 3]], 1) if f else b,
                    "labels": t["labels"]})
    return x, out


# ---------------------------------------------------------------------------------------------- YOLO loss

def _iou_matrix(a: Tensor, b: Tensor) -> Tensor:
    """IoU of ``a`` [B, M, 4] against ``b`` [B, A, 4]: ``[B, M, A]``."""
    lt = torch.maximum(a[:, :, None, :2], b[:, None, :, :2])
    rb = torch.minimum(a[:, :, None, 2:], b[:, None, :, 2:])
    inter = (rb - lt).clamp(min=0).prod(-1)
    area_a = (a[..., 2:] - a[..., :2]).prod(-1)[:, :, None]
    area_b = (b[..., 2:] - b[..., :2]).clamp(min=0).prod(-1)[:, None, :]
    return inter / (area_a + area_b - inter + 1e-9)


def task_aligned_targets(scores: Tensor, boxes: Tensor, points: Tensor, gt_boxes: Tensor, gt_labels: Tensor,
                         gt_mask: Tensor, topk: int = 10, alpha: float = 0.5, beta: float = 6.0):
    """YOLOv8's task-aligned assignment: per ground truth the ``topk`` anchors inside it with the best
    ``score^alpha * IoU^beta``; returns target boxes ``[B, A, 4]``, soft class targets ``[B, A, C]`` and
    the foreground mask ``[B, A]``."""
    b, a, c = scores.shape
    x, y = points[0], points[1]
    inside = ((x > gt_boxes[..., 0:1]) & (x < gt_boxes[..., 2:3]) & (y > gt_boxes[..., 1:2])
              & (y < gt_boxes[..., 3:4]) & gt_mask[..., None])  # [B, M, A]
    iou = _iou_matrix(gt_boxes, boxes) * inside
    cls = scores.gather(2, gt_labels[:, None, :].expand(b, a, -1)).transpose(1, 2)  # [B, M, A]
    metric = cls.pow(alpha) * iou.pow(beta) * inside
    top = torch.zeros_like(inside).scatter_(2, metric.topk(min(topk, a), -1).indices, True)
    pos = top & inside
    multi = pos.sum(1, keepdim=True) > 1
    best = F.one_hot(iou.argmax(1), gt_boxes.shape[1]).transpose(1, 2).bool()
    pos = torch.where(multi, best, pos)
    fg = pos.any(1)
    idx = pos.float().argmax(1)  # [B, A]
    t_boxes = gt_boxes.gather(1, idx[..., None].expand(-1, -1, 4))
    t_labels = gt_labels.gather(1, idx)
    metric, iou = metric * pos, iou * pos
    norm = (metric * iou.amax(-1, keepdim=True) / (metric.amax(-1, keepdim=True) + 1e-9)).amax(1)
    t_scores = F.one_hot(t_labels, c).float() * (norm * fg)[..., None]
    return t_boxes, t_scores, fg


def yolo_loss(model: nn.Module, x: Tensor, targets: list[dict]) -> Tensor:
    box_logits, cls_logits = model.raw(x)
    n, _, a = box_logits.shape
    points, strides = model.anchors[0], model.strides[0]  # [2, A] stride units, [1, A]
    dist = model.distances(box_logits)  # [N, 4, A]
    pred = torch.cat([points - dist[:, :2], points + dist[:, 2:]], 1).transpose(1, 2)  # [N, A, 4] stride units
    gt_boxes, gt_labels, gt_mask = _padded(targets)
    centres = (points * strides).detach()
    t_boxes, t_scores, fg = task_aligned_targets(cls_logits.detach().sigmoid().transpose(1, 2),
                                                 (pred * strides.T).detach(), centres, gt_boxes, gt_labels, gt_mask)
    total = t_scores.sum().clamp(min=1)
    cls = F.binary_cross_entropy_with_logits(cls_logits.transpose(1, 2), t_scores, reduction="sum") / total
    if not fg.any():
        return 0.5 * cls
    weight = t_scores.sum(-1)[fg]
    t_units = t_boxes / strides.T  # [N, A, 4] stride units
    iou = (complete_box_iou_loss(pred[fg], t_units[fg], reduction="none") * weight).sum() / total
    ltrb = torch.cat([points.T - t_units[..., :2], t_units[..., 2:] - points.T], -1)[fg].clamp(0, REG_MAX - 1.01)
    logits = box_logits.view(n, 4, REG_MAX, a).permute(0, 3, 1, 2)[fg]  # [F, 4, R]
    left = ltrb.long()
    wl = left + 1 - ltrb
    ce = (F.cross_entropy(logits.reshape(-1, REG_MAX), left.flatten(), reduction="none").view_as(ltrb) * wl
          + F.cross_entropy(logits.reshape(-1, REG_MAX), (left + 1).flatten(), reduction="none").view_as(ltrb)
          * (1 - wl))
    dfl = (ce.mean(-1) * weight).sum() / total
    return 7.5 * iou + 0.5 * cls + 1.5 * dfl


# ---------------------------------------------------------------------------------------------- SSD loss

_MATCHER, _CODER = det_utils.SSDMatcher(0.5), det_utils.BoxCoder((10.0, 10.0, 5.0, 5.0))


def ssd_loss(model: nn.Module, x: Tensor, targets: list[dict]) -> Tensor:
    codes, logits = model.raw(x)
    anchors = model.anchors  # y-x corners
    t_codes, t_classes = [], []
    for t in targets:
        gt = t["boxes"][:, [1, 0, 3, 2]]
        matched = _MATCHER(box_iou(gt, anchors))
        fg = matched >= 0
        t_codes.append(_CODER.encode_single(gt[matched.clamp(min=0)], anchors))
        t_classes.append(torch.where(fg, t["labels"][matched.clamp(min=0)] + 1, 0))
    t_codes, t_classes = torch.stack(t_codes), torch.stack(t_classes)
    fg = t_classes > 0
    n_pos = fg.sum().clamp(min=1)
    box = F.smooth_l1_loss(codes[fg], t_codes[fg], reduction="sum")
    ce = F.cross_entropy(logits.reshape(-1, CLASSES + 1), t_classes.flatten(), reduction="none").view_as(t_classes)
    negative = ce.masked_fill(fg, -float("inf"))
    rank = negative.argsort(1, descending=True).argsort(1)
    hard = rank < 3 * fg.sum(1, keepdim=True)
    return (box + ce[fg].sum() + ce[hard].sum()) / n_pos


LOSSES = {"yolo": yolo_loss, "ssd": ssd_loss}


# ---------------------------------------------------------------------------------------------- mAP

Detect = Callable[[Tensor], tuple[Tensor, Tensor, Tensor, Tensor]]


def mean_ap(detect: Detect, name: str, test: Mosaics, batch_size: int = 50) -> dict[str, float]:
    """COCO mAP@0.5:0.95 and mAP@0.5 (in points, 0-100) of ``detect``'s NMS outputs on ``test``
    (torchmetrics, faster-coco-eval backend)."""
    from torchmetrics.detection import MeanAveragePrecision

    metric = MeanAveragePrecision(box_format="xyxy", iou_type="bbox", backend="faster_coco_eval")
    for i, x in enumerate(test.batches(batch_size)):
        with torch.no_grad():
            boxes, scores, labels, n_valid = detect(x)
        boxes = xy_boxes(name, torch.as_tensor(boxes))
        preds = [{"boxes": boxes[k, :int(n)], "scores": torch.as_tensor(scores)[k, :int(n)],
                  "labels": torch.as_tensor(labels)[k, :int(n)].long()} for k, n in enumerate(n_valid.flatten())]
        metric.update(preds, test.targets[i * batch_size:(i + 1) * batch_size])
    out = metric.compute()
    return {"map": float(out["map"]) * 100, "map_50": float(out["map_50"]) * 100}


# ---------------------------------------------------------------------------------------------- training

def train(name: str, data: Mosaics, epochs: int, seed: int = 0, log=print) -> nn.Module:
    """AdamW + one-cycle schedule, batches of ``BATCH``, horizontal flips; returns the model in eval mode."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    model = DETECTORS[name]()
    steps = epochs * ((len(data) + BATCH - 1) // BATCH)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, LR[name], weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, LR[name], total_steps=steps, pct_start=0.15)
    start = time.time()
    for epoch in range(epochs):
        model.train()
        perm, running = torch.randperm(len(data), generator=g), 0.0
        for i in range(0, len(data), BATCH):
            idx = perm[i:i + BATCH]
            x, targets = _flip(data.images[idx], [data.targets[j] for j in idx.tolist()], g)
            loss = LOSSES[name](model, x, targets)
            opt.zero_grad()
            loss.backward()
            nn.utils.clip_grad_norm_(params, 10.0)
            opt.step()
            sched.step()
            running += float(loss.detach())
        log(f"epoch {epoch + 1}/{epochs}: loss {running / (len(data) / BATCH):.3f} ({time.time() - start:.0f} s)")
    return model.eval()


def test_canvases() -> Mosaics:
    return mosaics("test", TEST_CANVASES, TEST_SEED)


def path_of(name: str) -> str:
    return os.path.join(CACHE, f"det_{name}.pt")


def load(name: str) -> tuple[nn.Module, dict[str, float]]:
    """A cached trained detector and its float mAP (trains it first when missing)."""
    if not os.path.exists(path_of(name)):
        build(name)
    saved = torch.load(path_of(name), weights_only=True)
    model = DETECTORS[name]()
    model.load_state_dict(saved["state_dict"])
    return model.eval(), dict(saved["map"])


def build(name: str, epochs: int | None = None) -> dict[str, float]:
    start = time.time()
    data = mosaics("train", TRAIN_CANVASES, TRAIN_SEED)
    model = train(name, data, epochs or EPOCHS[name], log=lambda m: print(f"{name}: {m}", flush=True))
    score = mean_ap(model, name, test_canvases())
    os.makedirs(CACHE, exist_ok=True)
    torch.save({"state_dict": model.state_dict(), "map": score}, path_of(name))
    print(f"{name}: float mAP@0.5:0.95 {score['map']:.1f}, mAP@0.5 {score['map_50']:.1f} "
          f"({time.time() - start:.0f} s) -> {path_of(name)}", flush=True)
    return score


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=sorted(DETECTORS))
    parser.add_argument("--epochs", type=int, help="override the default number of epochs")
    parser.add_argument("--force", action="store_true", help="retrain even when cached")
    args = parser.parse_args()
    for name in [args.only] if args.only else list(DETECTORS):
        if args.force or not os.path.exists(path_of(name)):
            build(name, args.epochs)
        else:
            print(f"{name}: cached at {path_of(name)} ({load(name)[1]})")


if __name__ == "__main__":
    main()
