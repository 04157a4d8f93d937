"""The torchvision models and synthetic data the PTQ tests and the MCT comparison share.

Kept free of mct_fx imports so the same file runs in a scratch venv holding
Sony's MCT (``benchmarks/zoo_sqnr.py --tool mct``): both tools see exactly the
same weights, calibration batches and evaluation batch.
"""

from __future__ import annotations

import torch
import torchvision
from torch import nn

# name -> (constructor kwargs, input side)
SQNR_ZOO: dict[str, tuple[dict, int]] = {
    "resnet18": ({}, 64),
    "mobilenet_v2": ({}, 64),
    "efficientnet_b0": ({}, 64),
    "regnet_y_400mf": ({}, 64),
    "shufflenet_v2_x1_0": ({}, 64),
    "densenet121": ({}, 64),
    "convnext_tiny": ({}, 64),
    "vit_b_16": ({"image_size": 64}, 64),
}


def images(n: int, side: int, seed: int) -> torch.Tensor:
    """Normalised-image-like data: smooth random fields plus noise, zero mean, unit variance."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.randn(n, 3, max(2, side // 8), max(2, side // 8), generator=g)
    smooth = nn.functional.interpolate(coarse, size=(side, side), mode="bilinear", align_corners=False)
    x = smooth + 0.3 * torch.randn(n, 3, side, side, generator=g)
    return (x - x.mean()) / x.std()


def reestimate_bn(model: nn.Module, side: int, seed: int = 1, batches: int = 4, batch_size: int = 16) -> None:
    """Replace BN running statistics by their values on random images (random weights otherwise explode)."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns:
        return
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative average
    model.train()
    with torch.no_grad():
        for i in range(batches):
            model(images(batch_size, side, seed * 1000 + i))
    model.eval()


def build(name: str, seed: int = 0) -> tuple[nn.Module, int]:
    """Random-weight torchvision model (seeded), BN statistics re-estimated; and its input side.

    Layers that torchvision initialises to all zeros (ViT's head) get the default
    random init, so the output is not identically zero.
    """
    kwargs, side = SQNR_ZOO[name]
    torch.manual_seed(seed)
    model = torchvision.models.get_model(name, weights=None, **kwargs)
    for m in model.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)) and not m.weight.any():
            m.reset_parameters()
    reestimate_bn(model, side, seed=1 + seed)
    return model.eval(), side


def calibration(side: int, n_batches: int = 8, batch_size: int = 8) -> list[torch.Tensor]:
    return [images(batch_size, side, 100 + i) for i in range(n_batches)]


def evaluation(side: int, n: int = 16) -> torch.Tensor:
    return images(n, side, 999)


def sqnr_db(reference: torch.Tensor, test: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB of ``test`` against ``reference``."""
    noise = (reference.float() - test.float()).pow(2).mean()
    return float(10 * torch.log10(reference.float().pow(2).mean() / noise))
