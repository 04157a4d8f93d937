"""Second moments of the input vectors each weighted layer's rows read, gathered in one forward pass.

:func:`observe_input_grams` puts an :class:`InputGram` in front of the layers it
is given.  For a linear layer an input vector is a row of its input; for a
convolution it is the receptive field of one output position (the patch the
kernel multiplies, zero padding included, in the kernel's ``(channel, kh, kw)``
order), split by groups.  Each image contributes a seeded random sample (with
replacement) of ``per_image`` vectors (on average): a middle layer of a detector has ~10⁴
positions per image, and a few thousand vectors over the calibration set
estimate ``E[x xᵀ]`` as well as all of them.  :func:`remove_observers` (from
:mod:`mct_fx.passes.layer_inputs`) takes them out again.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

from mct_fx.graph_utils import groups_of
from mct_fx.passes.layer_inputs import insert_observer

__all__ = ["InputGram", "GRAM_LAYERS", "observe_input_grams"]

GRAM_LAYERS = (F.linear, F.conv1d, F.conv2d)  # the layers whose input vectors InputGram can read


class InputGram(nn.Module):
    """Identity that accumulates ``Σ x xᵀ`` and ``Σ x`` per group over sampled input vectors (no ``state_dict``)."""

    def __init__(self, layer: fx.Node, weight_shape: torch.Size, per_image: int, seed: int):
        super().__init__()
        if layer.target not in GRAM_LAYERS:
            raise TypeError(f"{layer.name}: InputGram reads the inputs of {GRAM_LAYERS}, not {layer.target}")
        self.groups = groups_of(layer)
        self.per_image = per_image
        self.generator = torch.Generator().manual_seed(seed)
        self.conv = None if layer.target is F.linear else _Geometry(layer, tuple(weight_shape[2:]))
        self.gram: Tensor | None = None  # [G, D, D]
        self.sum: Tensor | None = None  # [G, D]
        self.count = 0

    def forward(self, x: Tensor) -> Tensor:
        t = x.detach()
        wanted = self.per_image * (t.shape[0] if t.dim() > 1 else 1)
        v = self.conv.patches(t, wanted, self._pick) if self.conv else self._rows(t, wanted)
        width = v.shape[1] // self.groups
        if v.shape[0] == 0 or width * self.groups != v.shape[1] or (
                self.gram is not None and self.gram.shape[-1] != width):
            return x  # an empty batch, or one the layer cannot take: let the layer itself raise
        v = v.float().reshape(v.shape[0], self.groups, width).transpose(0, 1)  # [G, n, D]
        gram, total = torch.bmm(v.transpose(1, 2), v), v.sum(1)
        if self.gram is None:
            self.gram, self.sum = gram, total
        else:
            self.gram += gram
            self.sum += total
        self.count += v.shape[1]
        return x

    def rescale(self, factor: float) -> None:
        """The input was scaled by ``factor`` after it was observed (power-of-two alignment): follow it."""
        if self.gram is not None:
            self.gram *= factor * factor
            self.sum *= factor

    def second_moment(self) -> Tensor:
        """``E[x xᵀ]`` per group, ``[G, D, D]``."""
        if self.gram is None:
            raise RuntimeError("no data observed")
        return self.gram / self.count

    def mean(self) -> Tensor:
        """``E[x]`` per group, ``[G, D]``."""
        if self.sum is None:
            raise RuntimeError("no data observed")
        return self.sum / self.count

    def _pick(self, total: int, wanted: int, device: torch.device) -> Tensor:
        if total <= wanted:
            return torch.arange(total, device=device)
        return torch.randint(total, (wanted,), generator=self.generator).to(device)

    def _rows(self, x: Tensor, wanted: int) -> Tensor:
        rows = x.reshape(-1, x.shape[-1])
        return rows[self._pick(rows.shape[0], wanted, rows.device)]


class _Geometry:
    """Stride, padding and dilation of a conv1d / conv2d node, as 2-d (a 1-d conv is one row high)."""

    def __init__(self, layer: fx.Node, kernel: tuple[int, ...]):
        args = layer.args
        two_d = layer.target is F.conv2d
        self.kernel = kernel if two_d else (1, *kernel)
        self.stride = _pair(args[3], two_d, 1)
        self.dilation = _pair(args[5], two_d, 1)
        padding = args[4]
        if isinstance(padding, str):  # "valid" / "same" (the odd pixel of "same" goes right / below, as torch does)
            totals = [0 if padding == "valid" else d * (k - 1) for d, k in zip(self.dilation, self.kernel, strict=True)]
            self.pad = [(t // 2, t - t // 2) for t in totals]
        else:
            self.pad = [(p, p) for p in _pair(padding, two_d, 0)]
        self.taps: tuple[Tensor, Tensor] | None = None

    def patches(self, x: Tensor, wanted: int, pick) -> Tensor:
        """Sampled receptive fields ``[n, C * kh * kw]`` of the input ``x`` (``[N, C, (H,) W]``), zero padded."""
        x = x if x.dim() == 4 else x.unsqueeze(2)
        (kh, kw), (sh, sw), (dh, dw) = self.kernel, self.stride, self.dilation
        height, width = x.shape[2], x.shape[3]
        out_h = (height + sum(self.pad[0]) - dh * (kh - 1) - 1) // sh + 1
        out_w = (width + sum(self.pad[1]) - dw * (kw - 1) - 1) // sw + 1
        flat = pick(x.shape[0] * out_h * out_w, wanted, x.device)
        n, rest = flat // (out_h * out_w), flat % (out_h * out_w)
        taps_y, taps_x = self._taps(x.device)
        y = (rest // out_w * sh)[:, None] + taps_y  # [n, kh * kw]
        z = (rest % out_w * sw)[:, None] + taps_x
        if not any(p for pair in self.pad for p in pair):  # no padding: every tap is inside
            return x[n[:, None], :, y, z].transpose(1, 2).reshape(flat.shape[0], -1)
        inside = (y >= 0) & (y < height) & (z >= 0) & (z < width)
        values = x[n[:, None], :, y.clamp(0, height - 1), z.clamp(0, width - 1)]  # [n, kh * kw, C]
        return (values * inside[:, :, None]).transpose(1, 2).reshape(flat.shape[0], -1)

    def _taps(self, device: torch.device) -> tuple[Tensor, Tensor]:
        """Row and column offsets of the kernel's taps from a window's top-left corner (padding included)."""
        if self.taps is None or self.taps[0].device != device:
            (kh, kw), (dh, dw) = self.kernel, self.dilation
            self.taps = (torch.arange(kh, device=device).repeat_interleave(kw) * dh - self.pad[0][0],
                         torch.arange(kw, device=device).repeat(kh) * dw - self.pad[1][0])
        return self.taps


def _pair(v, two_d: bool, height: int) -> tuple[int, int]:
    """A conv argument as (height, width); a 1-d conv's height entry is ``height``."""
    v = tuple(v) if isinstance(v, (tuple, list)) else (v,) * (2 if two_d else 1)
    return (int(v[0]), int(v[1])) if two_d else (height, int(v[0]))


def observe_input_grams(gm: fx.GraphModule, layers: dict[str, torch.Size], per_image: int,
                        seed: int = 0) -> dict[str, InputGram]:
    """Insert an :class:`InputGram` before each layer in ``layers`` (name -> weight shape); returns them by name."""
    observers = {}
    for layer in [n for n in gm.graph.nodes if n.name in layers]:
        observers[layer.name] = insert_observer(gm, layer, "input_gram",
                                                InputGram(layer, layers[layer.name], per_image, seed + len(observers)))
    gm.recompile()
    return observers
