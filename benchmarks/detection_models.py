"""The two detection benchmark models, ending in box decoding and Sony's NMS as deployed models do.

* ``YoloDetector``: YOLOv8-style, anchor-free: C2f blocks, SPPF, a PAN neck, a decoupled head per
  stride (8, 16, 32), SiLU, distribution-focal box regression (``REG_MAX`` bins per side, read out
  by a fixed 1x1 conv as Ultralytics does);
* ``SsdDetector``: SSD-style: torchvision's SSDLite head on a MobileNetV3-large backbone of reduced
  width (Hardswish, squeeze-excitation), default boxes decoded by ``edgemdt_cl``'s
  ``FasterRCNNBoxDecode`` (y-x order).

``forward(x)`` takes ``[N, 1, 160, 160]`` images in ``[0, 1]`` and returns the NMS's
``(boxes [N, D, 4] corner pixels, scores [N, D], labels [N, D], n_valid [N, 1])``; the YOLO boxes are
x-y, the SSD boxes y-x (``xy_boxes`` converts). ``raw(x)`` returns what training needs.

Plain torch + torchvision + edgemdt_cl (no mct_fx), so that a peer's venv can import it.
"""

from __future__ import annotations

from functools import partial

import torch
from edgemdt_cl.pytorch import FasterRCNNBoxDecode, multiclass_nms
from torch import Tensor, nn

__all__ = ["YoloDetector", "SsdDetector", "DETECTORS", "REG_MAX", "NMS", "nms", "PreNms", "WithNms", "xy_boxes"]

SIZE, CLASSES, REG_MAX = 160, 10, 16
NMS = {"score_threshold": 0.001, "iou_threshold": 0.6, "max_detections": 100}


def nms(boxes: Tensor, scores: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Sony's multi-class NMS with the benchmark's thresholds, as a tuple."""
    res = multiclass_nms(boxes, scores, **NMS)
    return res.boxes, res.scores, res.labels, res.n_valid


class PreNms(nn.Module):
    """A detector without its NMS: ``(boxes, scores)``, for a tool that quantizes the network apart;
    ``split``: its C2f blocks switched to ``forward_split``, as Ultralytics' exporters do."""

    def __init__(self, detector: nn.Module, split: bool = False):
        super().__init__()
        self.detector = detector
        for m in detector.modules():
            if split and isinstance(m, C2f):
                m.forward = m.forward_split

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self.detector.pre_nms(x)


class WithNms(nn.Module):
    """``network`` (returning boxes and scores) followed by the NMS."""

    def __init__(self, network: nn.Module):
        super().__init__()
        self.network = network

    def forward(self, x: Tensor):
        return nms(*self.network(x))


class Conv(nn.Sequential):
    def __init__(self, cin: int, cout: int, k: int = 3, s: int = 1):
        super().__init__(nn.Conv2d(cin, cout, k, s, k // 2, bias=False), nn.BatchNorm2d(cout, eps=1e-3, momentum=0.03),
                         nn.SiLU())


class Bottleneck(nn.Module):
    def __init__(self, c: int, shortcut: bool):
        super().__init__()
        self.cv1, self.cv2, self.add = Conv(c, c), Conv(c, c), shortcut

    def forward(self, x: Tensor) -> Tensor:
        y = self.cv2(self.cv1(x))
        return x + y if self.add else y


class C2f(nn.Module):
    def __init__(self, cin: int, cout: int, n: int = 1, shortcut: bool = True):
        super().__init__()
        self.c = cout // 2
        self.cv1 = Conv(cin, 2 * self.c, 1)
        self.cv2 = Conv((2 + n) * self.c, cout, 1)
        self.m = nn.ModuleList(Bottleneck(self.c, shortcut) for _ in range(n))

    def forward(self, x: Tensor) -> Tensor:
        y = list(self.cv1(x).chunk(2, 1))  # as Ultralytics writes it
        for m in self.m:
            y.append(m(y[-1]))
        return self.cv2(torch.cat(y, 1))

    def forward_split(self, x: Tensor) -> Tensor:
        """The same with split and indexing: what Ultralytics' exporters switch to (torch.fx cannot unpack
        ``chunk``; mct_fx's tracer can)."""
        y = self.cv1(x).split((self.c, self.c), 1)
        y = [y[0], y[1]]
        for m in self.m:
            y.append(m(y[-1]))
        return self.cv2(torch.cat(y, 1))


class SPPF(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.cv1, self.cv2 = Conv(cin, cin // 2, 1), Conv(cin * 2, cout, 1)
        self.pool = nn.MaxPool2d(5, 1, 2)

    def forward(self, x: Tensor) -> Tensor:
        y = [self.cv1(x)]
        for _ in range(3):
            y.append(self.pool(y[-1]))
        return self.cv2(torch.cat(y, 1))


def _grid(strides: tuple[int, ...]) -> tuple[Tensor, Tensor]:
    """Anchor centres ``[2, A]`` (x, y, in stride units) and their strides ``[1, A]``, level by level."""
    points, steps = [], []
    for s in strides:
        n = SIZE // s
        ys, xs = torch.meshgrid(torch.arange(n) + 0.5, torch.arange(n) + 0.5, indexing="ij")
        points.append(torch.stack([xs.flatten(), ys.flatten()]))
        steps.append(torch.full((1, n * n), float(s)))
    return torch.cat(points, 1), torch.cat(steps, 1)


class YoloDetector(nn.Module):
    STRIDES = (8, 16, 32)

    def __init__(self, widths: tuple[int, ...] = (16, 32, 64, 96, 128), head: int = 64):
        super().__init__()
        w0, w1, w2, w3, w4 = widths
        self.stem = nn.Sequential(Conv(1, w0, 3, 2), Conv(w0, w1, 3, 2), C2f(w1, w1))
        self.p3 = nn.Sequential(Conv(w1, w2, 3, 2), C2f(w2, w2, 2))
        self.p4 = nn.Sequential(Conv(w2, w3, 3, 2), C2f(w3, w3, 2))
        self.p5 = nn.Sequential(Conv(w3, w4, 3, 2), C2f(w4, w4), SPPF(w4, w4))
        self.up = nn.Upsample(scale_factor=2, mode="nearest")
        self.top4, self.top3 = C2f(w4 + w3, w3, shortcut=False), C2f(w3 + w2, w2, shortcut=False)
        self.down3, self.bottom4 = Conv(w2, w2, 3, 2), C2f(w2 + w3, w3, shortcut=False)
        self.down4, self.bottom5 = Conv(w3, w3, 3, 2), C2f(w3 + w4, w4, shortcut=False)
        self.box = nn.ModuleList(nn.Sequential(Conv(c, head), Conv(head, head), nn.Conv2d(head, 4 * REG_MAX, 1))
                                 for c in (w2, w3, w4))
        self.cls = nn.ModuleList(nn.Sequential(Conv(c, head), Conv(head, head), nn.Conv2d(head, CLASSES, 1))
                                 for c in (w2, w3, w4))
        self.dfl = nn.Conv2d(REG_MAX, 1, 1, bias=False).requires_grad_(False)
        self.dfl.weight.data[:] = torch.arange(REG_MAX, dtype=torch.float32).view(1, REG_MAX, 1, 1)
        anchors, strides = _grid(self.STRIDES)
        self.register_buffer("anchors", anchors[None])
        self.register_buffer("strides", strides[None])
        for seq, prior in ((self.cls, -4.6), (self.box, 1.0)):  # cls: sigmoid ~ 0.01 at start
            for s in seq:
                nn.init.constant_(s[-1].bias, prior)

    def raw(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Box-bin logits ``[N, 4 * REG_MAX, A]`` and class logits ``[N, CLASSES, A]``."""
        c3 = self.p3(self.stem(x))
        c4 = self.p4(c3)
        c5 = self.p5(c4)
        t4 = self.top4(torch.cat([self.up(c5), c4], 1))
        o3 = self.top3(torch.cat([self.up(t4), c3], 1))
        o4 = self.bottom4(torch.cat([self.down3(o3), t4], 1))
        o5 = self.bottom5(torch.cat([self.down4(o4), c5], 1))
        feats = (o3, o4, o5)
        box = torch.cat([h(f).flatten(2) for h, f in zip(self.box, feats, strict=True)], 2)
        cls = torch.cat([h(f).flatten(2) for h, f in zip(self.cls, feats, strict=True)], 2)
        return box, cls

    def distances(self, box: Tensor) -> Tensor:
        """Expected left/top/right/bottom distances ``[N, 4, A]`` (stride units) of the bin logits."""
        n, _, a = box.shape
        bins = box.view(n, 4, REG_MAX, a).transpose(2, 1).softmax(1)
        return self.dfl(bins).view(n, 4, a)

    def decode(self, box: Tensor, cls: Tensor) -> tuple[Tensor, Tensor]:
        """Corner boxes ``[N, A, 4]`` (x-y pixels) and class scores ``[N, A, CLASSES]``."""
        d = self.distances(box)
        lt, rb = d[:, :2], d[:, 2:]
        boxes = torch.cat([self.anchors - lt, self.anchors + rb], 1) * self.strides
        return boxes.transpose(1, 2), cls.sigmoid().transpose(1, 2)

    def pre_nms(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self.decode(*self.raw(x))

    def forward(self, x: Tensor):
        return nms(*self.pre_nms(x))


def _ssd_parts(width: float):
    from torchvision.models import mobilenet_v3_large
    from torchvision.models.detection.anchor_utils import DefaultBoxGenerator
    from torchvision.models.detection.image_list import ImageList
    from torchvision.models.detection.ssdlite import SSDLiteHead, _mobilenet_extractor

    norm = partial(nn.BatchNorm2d, eps=1e-3, momentum=0.03)
    backbone = mobilenet_v3_large(width_mult=width, reduced_tail=True, norm_layer=norm)
    first = backbone.features[0][0]
    backbone.features[0][0] = nn.Conv2d(1, first.out_channels, 3, 2, 1, bias=False)
    extractor = _mobilenet_extractor(backbone, 6, norm)
    with torch.no_grad():
        feats = list(extractor.eval()(torch.zeros(1, 1, SIZE, SIZE)).values())
    extractor.train()
    generator = DefaultBoxGenerator([[2, 3]] * len(feats), min_ratio=0.12, max_ratio=0.8)
    anchors = generator(ImageList(torch.zeros(1, 1, SIZE, SIZE), [(SIZE, SIZE)]), feats)[0]  # x-y corners
    head = SSDLiteHead([f.shape[1] for f in feats], generator.num_anchors_per_location(), CLASSES + 1, norm)
    return extractor, head, anchors[:, [1, 0, 3, 2]]


class SsdDetector(nn.Module):
    SCALES = (10.0, 10.0, 5.0, 5.0)

    def __init__(self, width: float = 0.5):
        super().__init__()
        self.backbone, self.head, anchors = _ssd_parts(width)
        self.register_buffer("anchors", anchors)  # [A, 4] y-x corners, pixels
        self.box_decode = FasterRCNNBoxDecode(anchors, self.SCALES, (0, 0, SIZE, SIZE))

    def raw(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Box codes ``[N, A, 4]`` (y, x, h, w) and class logits ``[N, A, CLASSES + 1]`` (0: background)."""
        out = self.head(list(self.backbone(x).values()))
        return out["bbox_regression"], out["cls_logits"]

    def pre_nms(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Corner boxes ``[N, A, 4]`` (y-x pixels) and class scores ``[N, A, CLASSES]``."""
        codes, logits = self.raw(x)
        return self.box_decode(codes), logits.softmax(-1)[..., 1:]

    def forward(self, x: Tensor):
        return nms(*self.pre_nms(x))


def xy_boxes(name: str, boxes: Tensor) -> Tensor:
    """The detector's output boxes in x-y corner order."""
    return boxes[..., [1, 0, 3, 2]] if name == "ssd" else boxes


DETECTORS = {"yolo": YoloDetector, "ssd": SsdDetector}
