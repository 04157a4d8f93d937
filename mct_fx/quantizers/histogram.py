"""Streaming activation histogram that lives on the activation's device.

The histogram covers ``[-R, R)`` with ``2 * bins_per_side`` equal bins, bin
edges anchored at zero and ``R`` a power of two.  When a batch exceeds the
range, ``R`` doubles (as many times as needed) and adjacent bins merge
exactly, so the result does not depend on batch order except through the
final range.  Updates are pure tensor ops: no host synchronisation per batch.
Exact minimum and maximum are tracked beside it.

Large activations are binned from a strided sample of at most ``max_samples`` (2^18)
values per update (the minimum and maximum still see every value): binning is
the one pass over the data that a CPU cannot parallelise, and a few million
values per batch and tensor fix the threshold search as well as all of them.
The stride is a prime that does not divide common tensor dimensions, so the
sample does not lock onto a channel or a column.
"""

from __future__ import annotations

import torch
from torch import Tensor

from mct_fx.kernels import histogram
from mct_fx.quantizers.params import MIN_THRESHOLD

__all__ = ["StreamingHistogram", "z_score_filter"]


class StreamingHistogram:
    """Histogram of every value seen by :meth:`update`."""

    def __init__(self, bins_per_side: int = 4096, max_samples: int = 2**18):
        self.bins_per_side = bins_per_side
        self.max_samples = max_samples
        self.counts: Tensor | None = None  # int64 [2 * bins_per_side]
        self.range: Tensor | None = None  # float32 scalar, a power of two
        self.min: Tensor | None = None
        self.max: Tensor | None = None
        self.updates = 0
        self.offset = 0.0  # added to every value seen (see :meth:`shift`)
        self.factor = 1.0  # every value seen multiplied by it, before the offset (see :meth:`scale`)

    @property
    def empty(self) -> bool:
        return self.counts is None

    def update(self, x: Tensor) -> None:
        if self.offset or self.factor != 1.0:
            raise RuntimeError("a shifted or scaled histogram cannot take more data")
        x = x.detach().float().reshape(-1)
        if x.numel() == 0:
            return
        lo, hi = torch.aminmax(x)
        needed = torch.clamp(torch.maximum(lo.abs(), hi.abs()), min=MIN_THRESHOLD)
        n = self.bins_per_side
        if self.counts is None:
            self.counts = torch.zeros(2 * n, dtype=torch.int64, device=x.device)
            self.range = torch.exp2(torch.ceil(torch.log2(needed)))
            self.min, self.max = lo, hi
        else:
            factor = torch.clamp(torch.exp2(torch.ceil(torch.log2(needed / self.range))), min=1.0)
            offsets = torch.arange(2 * n, device=x.device) - n
            merged = torch.floor(offsets / factor).long() + n
            self.counts = torch.zeros_like(self.counts).index_add_(0, merged, self.counts)
            self.range = self.range * factor
            self.min, self.max = torch.minimum(self.min, lo), torch.maximum(self.max, hi)
        self.counts += _bin_counts(_sample(x, self.max_samples, self.updates), self.range, 2 * n)
        self.updates += 1

    def shift(self, offset: float) -> None:
        """Account for a constant added to every value already seen (exact: the bins move with it)."""
        if self.counts is None:
            raise RuntimeError("histogram is empty: no data was observed")
        self.offset += offset
        self.min, self.max = self.min + offset, self.max + offset

    def scale(self, factor: float) -> None:
        """Account for every value already seen being multiplied by ``factor`` > 0 (exact: the bins move with it)."""
        if self.counts is None:
            raise RuntimeError("histogram is empty: no data was observed")
        if not factor > 0:
            raise ValueError(f"histogram scale factor must be > 0, got {factor}")
        self.factor *= factor
        self.offset *= factor
        self.min, self.max = self.min * factor, self.max * factor

    def centres_and_counts(self, trim: bool = True) -> tuple[Tensor, Tensor]:
        """Bin centres and counts (float32), trimmed to the non-empty span when ``trim``."""
        if self.counts is None:
            raise RuntimeError("histogram is empty: no data was observed")
        n = self.bins_per_side
        width = self.range / n
        centres = (torch.arange(2 * n, device=self.counts.device) - n + 0.5) * (width * self.factor) + self.offset
        counts = self.counts.float()
        if trim:
            nz = torch.nonzero(self.counts).flatten()
            if nz.numel():
                first, last = int(nz[0]), int(nz[-1]) + 1
                centres, counts = centres[first:last], counts[first:last]
        return centres, counts


def z_score_filter(centres: Tensor, counts: Tensor, lo: Tensor, hi: Tensor,
                   z: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Drop the bins further than ``z`` standard deviations from the mean (outliers).

    Returns the kept ``(centres, counts)`` and the range ``[lo, hi]`` narrowed to them,
    so the grid search neither covers nor weighs values that calibration saw only rarely.
    """
    total = counts.sum()
    mean = (centres * counts).sum() / total
    std = torch.sqrt((counts * (centres - mean) ** 2).sum() / total)
    keep = (centres - mean).abs() <= z * std
    if not bool(keep.any()):
        return centres, counts, lo, hi
    centres, counts = centres[keep], counts[keep]
    half_bin = (centres[1] - centres[0]) / 2 if centres.numel() > 1 else torch.zeros(())
    return centres, counts, torch.maximum(lo, centres[0] - half_bin), torch.minimum(hi, centres[-1] + half_bin)


_STRIDES = (1, 5, 11, 13, 17, 19, 23, 29, 31, 37, 41, 43, 47, 53, 59, 61, 67, 71, 73, 79, 83, 89, 97)


def _sample(x: Tensor, max_samples: int, offset: int) -> Tensor:
    """Every k-th value of flat ``x`` (k prime, not 2, 3 or 7) so that at most ``max_samples`` remain;
    the start moves with ``offset`` so successive batches sample different positions."""
    need = -(-x.numel() // max_samples)
    stride = next((k for k in _STRIDES if k >= need), need | 1)
    return x if stride == 1 else x[offset % stride::stride].contiguous()


def _bin_counts(x: Tensor, r: Tensor, bins: int) -> Tensor:
    """Counts of ``x`` (all within ``[-r, r]``) in ``bins`` equal bins over ``[-r, r]``."""
    return histogram(x, r, bins)
