"""``BoundedReLU``: ``clamp(x, 0, bound)`` with the bound in a buffer.

ReLU6 and Hardtanh(0, b) are positively homogeneous once their bound scales
with the input, so passes that rescale a layer (ReLU bound to a power of two,
power-of-two alignment) rewrite them into this module and move the bound with
the scale.  Keeping the bound in a buffer keeps that rescaling in the
``state_dict``: a freshly prepared model that loads it computes the same thing.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["BoundedReLU"]


class BoundedReLU(nn.Module):
    """``clamp(x, 0, bound)``: a ReLU6 / Hardtanh(0, b) whose bound passes may rescale."""

    min_val = 0.0

    def __init__(self, bound: float):
        super().__init__()
        if not bound > 0:
            raise ValueError(f"BoundedReLU: bound must be > 0, got {bound}")
        self.register_buffer("bound", torch.tensor(float(bound)))

    @property
    def max_val(self) -> float:
        return float(self.bound)

    def forward(self, x: Tensor) -> Tensor:
        # relu + minimum rather than clamp(min=0.0, max=tensor): torch.compile traces this form (2.14)
        return torch.minimum(torch.relu(x), self.bound.to(x.dtype))

    def extra_repr(self) -> str:
        return f"bound={self.max_val:g}"
