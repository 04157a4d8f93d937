"""Data-free calibration: images optimized until every BatchNorm layer sees the statistics it was trained on.

``generate_data`` traces the float model, exposes the per-sample mean/variance
of every BatchNorm input (:mod:`mct_fx.passes.tap_bn_inputs`), and optimizes a
set of images (each batch with its own optimizer and scheduler) to minimize

    sum_l w_l * (|mean_l - running_mean_l|^2 / C_l + |std_l - running_std_l|^2 / C_l)
    + output_loss_weight * output loss

where the statistics are taken over all images (the batches not being updated
contribute their last, detached values), over the batch, or per image.  The
images are the smoothed centre of larger canvases, randomly flipped and
cropped at every step, and projected back onto the valid pixel range after
every step.  Only the images get gradients: the model's parameters do not.
The result feeds ``mct_fx.quantize`` directly (a tensor is a set of samples).
"""

from __future__ import annotations

import contextlib
import enum
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn
from torch.optim.lr_scheduler import ReduceLROnPlateau, StepLR
from torch.utils._pytree import tree_leaves
from tqdm.auto import tqdm

from mct_fx.graph_utils import model_device
from mct_fx.passes.tap_bn_inputs import BNTap, BNTapError, tap_bn_inputs
from mct_fx.tensorboard import TensorBoardLogger
from mct_fx.trace import trace

__all__ = ["generate_data", "bn_alignment", "DataGenConfig", "DataInit", "LayerWeighting", "ImageGranularity",
           "OutputLoss", "Scheduler", "BNTapError", "NORMALIZATIONS"]

EPS = 1e-6
# per-channel (mean, std) that map pixels in [0, 1] to the model's input
NORMALIZATIONS = {"torchvision": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
                  "symmetric": ((0.5,), (0.5,)),  # [-1, 1]
                  "none": ((0.0,), (1.0,))}  # [0, 1]


class DataInit(str, enum.Enum):
    GAUSSIAN = "gaussian"  # i.i.d. pixels spanning the valid range
    DIVERSE = "diverse"  # per image and channel a random mean and contrast, smoothed


class LayerWeighting(str, enum.Enum):
    AVERAGE = "average"  # 1 / L each
    FIRST_LAYER = "first_layer"  # the first BatchNorm 10x the others
    GRADIENT = "gradient"  # inverse of each layer's pull on the images at the start: every layer pulls alike


class ImageGranularity(str, enum.Enum):
    ALL_IMAGES = "all_images"
    BATCH = "batch"
    IMAGE = "image"


class OutputLoss(str, enum.Enum):
    NEGATIVE_MIN_MAX = "negative_min_max"  # -(max - min) of each output row: confident, spread logits
    INVERSE_MIN_MAX = "inverse_min_max"  # 1 / mean(max - min)
    NONE = "none"


class Scheduler(str, enum.Enum):
    REDUCE_ON_PLATEAU_WITH_RESET = "reduce_on_plateau_with_reset"
    REDUCE_ON_PLATEAU = "reduce_on_plateau"
    STEP = "step"
    CONSTANT = "constant"


@dataclass(frozen=True)
class DataGenConfig:
    """How images are generated.

    ``n_iter`` passes over all batches of ``batch_size`` images; ``optimizer`` (a
    ``torch.optim`` class) at ``lr`` per batch, with ``scheduler``.
    ``normalization``: how the model expects pixels in [0, 1] to be normalized,
    ``"torchvision"`` (ImageNet mean/std), ``"symmetric"`` ([-1, 1]), ``"none"``
    ([0, 1]) or a ``(mean, std)`` pair of per-channel sequences; with ``clip``
    the images stay inside that valid range.  ``extra_pixels``: the canvas is
    that much larger than the image (random crops while optimizing, the centre
    at the end); ``smoothing_sigma``: a 3x3 Gaussian blur in the image path
    (None: none); ``flip``: random horizontal flips.  ``autocast``: bfloat16
    autocast (default: on CUDA only).  ``log_dir``: TensorBoard scalars
    ``datagen/bn_loss`` and ``datagen/output_loss`` per iteration.
    """

    n_iter: int = 500
    batch_size: int = 32
    optimizer: type[torch.optim.Optimizer] = torch.optim.RAdam
    lr: float = 16.0
    scheduler: Scheduler = Scheduler.REDUCE_ON_PLATEAU_WITH_RESET
    output_loss: OutputLoss = OutputLoss.NEGATIVE_MIN_MAX
    output_loss_weight: float = 1e-5
    layer_weighting: LayerWeighting = LayerWeighting.AVERAGE
    granularity: ImageGranularity = ImageGranularity.ALL_IMAGES
    init: DataInit = DataInit.GAUSSIAN
    normalization: str | tuple[Sequence[float], Sequence[float]] = "torchvision"
    clip: bool = True
    extra_pixels: int = 32
    smoothing_sigma: float | None = 1.25
    flip: bool = True
    autocast: bool | None = None
    seed: int = 0
    log_dir: str | None = None

    def __post_init__(self):
        for name, cls in (("scheduler", Scheduler), ("output_loss", OutputLoss), ("layer_weighting", LayerWeighting),
                          ("granularity", ImageGranularity), ("init", DataInit)):
            try:
                object.__setattr__(self, name, cls(getattr(self, name)))
            except ValueError:
                raise ValueError(f"DataGenConfig.{name}: {getattr(self, name)!r} is not one of "
                                 f"{[m.value for m in cls]}") from None
        for name in ("n_iter", "batch_size"):
            value = getattr(self, name)
            if not (isinstance(value, int) and value >= 1):
                raise ValueError(f"DataGenConfig.{name}: expected a positive integer, got {value!r}")
        if not (isinstance(self.extra_pixels, int) and self.extra_pixels >= 0):
            raise ValueError(f"DataGenConfig.extra_pixels: expected an integer >= 0, got {self.extra_pixels!r}")
        if not self.lr > 0:
            raise ValueError(f"DataGenConfig.lr: must be > 0, got {self.lr!r}")
        if not self.output_loss_weight >= 0:
            raise ValueError(f"DataGenConfig.output_loss_weight: must be >= 0, got {self.output_loss_weight!r}")
        if self.smoothing_sigma is not None and not self.smoothing_sigma > 0:
            raise ValueError(f"DataGenConfig.smoothing_sigma: must be > 0 or None, got {self.smoothing_sigma!r}")
        if not (isinstance(self.optimizer, type) and issubclass(self.optimizer, torch.optim.Optimizer)):
            raise ValueError(f"DataGenConfig.optimizer: expected a torch.optim.Optimizer class, got {self.optimizer!r}")
        if isinstance(self.normalization, str) and self.normalization not in NORMALIZATIONS:
            raise ValueError(f"DataGenConfig.normalization: {self.normalization!r} is not one of "
                             f"{list(NORMALIZATIONS)} nor a (mean, std) pair")


# ------------------------------------------------------------------ images


class _Pixels:
    """The valid range of each input channel and the image path (augment while optimizing, finalize at the end)."""

    def __init__(self, shape: tuple[int, ...], config: DataGenConfig, device: torch.device):
        channels = shape[0]
        mean, std = (NORMALIZATIONS[config.normalization] if isinstance(config.normalization, str)
                     else config.normalization)
        mean, std = (torch.as_tensor(v, dtype=torch.float32).flatten() for v in (mean, std))
        for name, v in (("mean", mean), ("std", std)):
            if v.numel() not in (1, channels):
                raise ValueError(f"DataGenConfig.normalization: {v.numel()} {name} values for {channels} input "
                                 f"channel(s)")
        if not bool((std > 0).all()):
            raise ValueError("DataGenConfig.normalization: std values must be > 0")
        view = (1, -1, 1, 1)
        self.low = ((0 - mean) / std).expand(channels).reshape(view).to(device)
        self.high = ((1 - mean) / std).expand(channels).reshape(view).to(device)
        self.size = shape[1:]
        self.config = config
        self.kernel = None
        if config.smoothing_sigma is not None:
            axis = torch.arange(3, dtype=torch.float32) - 1
            k = torch.exp(-(axis[:, None] ** 2 + axis[None, :] ** 2) / (2 * config.smoothing_sigma ** 2))
            self.kernel = (k / k.sum()).expand(channels, 1, 3, 3).contiguous().to(device)

    def smooth(self, x: Tensor) -> Tensor:
        if self.kernel is None:
            return x
        return F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), self.kernel.to(x.dtype), groups=x.shape[1])

    def augment(self, x: Tensor, generator: torch.Generator) -> Tensor:
        """Flip (half the time), smooth, and a random crop of the image size."""
        if self.config.flip and bool(torch.rand((), generator=generator) < 0.5):
            x = x.flip(-1)
        x = self.smooth(x)
        extra_h, extra_w = x.shape[-2] - self.size[0], x.shape[-1] - self.size[1]
        top = int(torch.randint(extra_h + 1, (), generator=generator))
        left = int(torch.randint(extra_w + 1, (), generator=generator))
        return x[..., top:top + self.size[0], left:left + self.size[1]]

    def finalize(self, x: Tensor) -> Tensor:
        """Smooth, take the centre, clip."""
        x = self.smooth(x)
        top, left = (x.shape[-2] - self.size[0]) // 2, (x.shape[-1] - self.size[1]) // 2
        return self.clip(x[..., top:top + self.size[0], left:left + self.size[1]])

    def clip(self, x: Tensor) -> Tensor:
        return torch.clamp(x, self.low, self.high) if self.config.clip else x

    def initial(self, n: int, generator: torch.Generator) -> Tensor:
        """``n`` canvases: Gaussian spanning the valid range, or per-image random means/contrasts, smoothed."""
        centre, spread = (self.low + self.high) / 2, (self.high - self.low) / 4
        c, (h, w) = self.low.shape[1], self.size
        shape = (n, c, h + self.config.extra_pixels, w + self.config.extra_pixels)
        noise = torch.randn(shape, generator=generator).to(self.low.device)
        if self.config.init is DataInit.GAUSSIAN:
            return self.clip(centre + spread * noise)
        mean = centre + spread * torch.randn((n, c, 1, 1), generator=generator).to(self.low.device)
        contrast = spread * (0.25 + 1.5 * torch.rand((n, c, 1, 1), generator=generator).to(self.low.device))
        return self.clip(self.smooth(self.smooth(mean + contrast * noise)))


# ------------------------------------------------------------------ losses


class _Targets:
    """Running statistics of every tapped BatchNorm, concatenated over layers (``[sum C_l]``)."""

    def __init__(self, taps: list[BNTap], device: torch.device):
        self.names = [t.name for t in taps]
        self.sizes = [t.mean.numel() for t in taps]
        self.mean = torch.cat([t.mean for t in taps]).to(device)
        self.std = torch.cat([t.var for t in taps]).clamp_min(0).sqrt().to(device)
        sizes = torch.tensor(self.sizes, device=device)
        self.layer = torch.repeat_interleave(torch.arange(len(taps), device=device), sizes)
        self.inverse_size = 1 / sizes.float()

    def per_layer(self, sq_error: Tensor) -> Tensor:
        """Per-layer mean over channels of a ``[..., sum C_l]`` error: ``[..., L]``."""
        out = sq_error.new_zeros(*sq_error.shape[:-1], len(self.sizes))
        return out.index_add_(-1, self.layer, sq_error) * self.inverse_size


def _concat(stats: Sequence[tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
    """Per-sample ``(mean, second moment)`` ``[N, sum C_l]`` from the tapped per-layer pairs."""
    return torch.cat([m for m, _ in stats], dim=1), torch.cat([s for _, s in stats], dim=1)


def _layer_losses(mean: Tensor, second: Tensor, targets: _Targets) -> Tensor:
    """Per-layer alignment loss of aggregated ``mean`` / ``second`` moments (``[..., sum C_l]``)."""
    std = (second - mean * mean).clamp_min(0).add(EPS).sqrt()
    return targets.per_layer((mean - targets.mean) ** 2 + (std - targets.std) ** 2)


class _Aggregate:
    """Per-batch sums of the per-sample moments, for statistics over all images."""

    def __init__(self, n_batches: int, width: int, device: torch.device):
        self.mean = torch.zeros(n_batches, width, device=device)
        self.second = torch.zeros(n_batches, width, device=device)

    def set(self, index: int, mean: Tensor, second: Tensor) -> None:
        self.mean[index] = mean.detach().sum(0)
        self.second[index] = second.detach().sum(0)

    def with_batch(self, index: int, mean: Tensor, second: Tensor) -> tuple[Tensor, Tensor]:
        """Sums over all images, batch ``index`` replaced by the given (differentiable) moments."""
        return (self.mean.sum(0) - self.mean[index] + mean.sum(0),
                self.second.sum(0) - self.second[index] + second.sum(0))


def _bn_loss(stats, targets: _Targets, weights: Tensor, granularity: ImageGranularity,
             aggregate: _Aggregate | None, index: int, n_images: int) -> tuple[Tensor, Tensor, Tensor]:
    """``(weighted loss, per-sample mean, per-sample second moment)`` of one batch."""
    mean, second = _concat(stats)
    if granularity is ImageGranularity.IMAGE:
        layers = _layer_losses(mean, second, targets).mean(0)
    elif granularity is ImageGranularity.BATCH:
        layers = _layer_losses(mean.mean(0), second.mean(0), targets)
    else:
        total_mean, total_second = aggregate.with_batch(index, mean, second)
        layers = _layer_losses(total_mean / n_images, total_second / n_images, targets)
    return (weights * layers).sum(), mean, second


def _output_loss(output: Any, kind: OutputLoss) -> Tensor | float:
    tensors = [t for t in tree_leaves(output) if isinstance(t, Tensor) and t.dim() >= 1 and t.is_floating_point()]
    if kind is OutputLoss.NONE or not tensors:
        return 0.0
    loss = 0.0
    for t in tensors:
        rows = t.float().flatten(1) if t.dim() > 1 else t.float()[None]
        spread = rows.amax(1) - rows.amin(1)
        loss = loss + (-spread.mean() if kind is OutputLoss.NEGATIVE_MIN_MAX else 1 / (spread.mean() + EPS))
    return loss


def _layer_weights(kind: LayerWeighting, gm: fx.GraphModule, first: Tensor, pixels: _Pixels, targets: _Targets,
                   generator: torch.Generator) -> Tensor:
    n = len(targets.sizes)
    device = targets.mean.device
    if kind is LayerWeighting.AVERAGE:
        return torch.full((n,), 1 / n, device=device)
    if kind is LayerWeighting.FIRST_LAYER:
        w = torch.ones(n, device=device)
        w[0] = 10
        return w / n
    x = first[:8].detach().clone().requires_grad_()
    _, stats = gm(pixels.augment(x, generator))
    mean, second = _concat(stats)
    layers = _layer_losses(mean.mean(0), second.mean(0), targets)
    norms = torch.stack([torch.linalg.vector_norm(torch.autograd.grad(layers[i], x, retain_graph=i < n - 1)[0])
                         for i in range(n)])
    inverse = torch.where(norms > 0, 1 / norms.clamp_min(1e-30), torch.zeros_like(norms))
    if not bool(inverse.sum() > 0):
        return torch.full((n,), 1 / n, device=device)
    return inverse / inverse.sum()


# ------------------------------------------------------------------ optimization


class _ReduceOnPlateauWithReset(ReduceLROnPlateau):
    """``ReduceLROnPlateau`` that forgets its best loss after each reduction (waits ``patience`` again)."""

    def _reduce_lr(self, epoch) -> None:
        super()._reduce_lr(epoch)
        self.best = self.mode_worse


def _scheduler(kind: Scheduler, optimizer: torch.optim.Optimizer, n_iter: int):
    patience = max(1, n_iter // 50)
    if kind is Scheduler.REDUCE_ON_PLATEAU_WITH_RESET:
        return _ReduceOnPlateauWithReset(optimizer, factor=0.5, patience=patience, min_lr=1e-4)
    if kind is Scheduler.REDUCE_ON_PLATEAU:
        return ReduceLROnPlateau(optimizer, factor=0.5, patience=patience, min_lr=1e-4)
    if kind is Scheduler.STEP:
        return StepLR(optimizer, step_size=max(1, n_iter // 3), gamma=0.1)
    return None


def _check_shape(shape: Sequence[int]) -> tuple[int, ...]:
    shape = tuple(shape) if isinstance(shape, (tuple, list, torch.Size)) else (shape,)
    if len(shape) != 3 or not all(isinstance(s, int) and s >= 1 for s in shape):
        raise ValueError(f"generate_data: shape must be (channels, height, width) of one image, got {shape!r}")
    return shape


def _prepare(model: nn.Module, leaf_modules, concrete_args,
             example: Tensor | None = None) -> tuple[fx.GraphModule, list[BNTap]]:
    """The traced copy with its BatchNorm inputs tapped and no parameter gradients; ``example`` (one input)
    checks the shape first, naming the node that rejects it."""
    # torch.ao's QAT conv-bn modules stay whole, so that the check names them (fx cannot trace into them)
    from torch.ao.nn.intrinsic.qat.modules.conv_fused import _ConvBnNd

    gm = trace(model, None if example is None else ((example,), {}), leaf_modules=(*leaf_modules, _ConvBnNd),
               concrete_args=concrete_args)
    taps = tap_bn_inputs(gm)
    for p in gm.parameters():
        p.requires_grad_(False)
    return gm, taps


def generate_data(model: nn.Module, n_images: int, shape: Sequence[int], config: DataGenConfig | None = None, *,
                  verbose: bool = True, leaf_modules: Iterable[type | str] = (),
                  concrete_args: dict[str, Any] | None = None,
                  on_iteration: Callable[[int, float, float], None] | None = None) -> Tensor:
    """``n_images`` images of ``shape`` (C, H, W) whose statistics at every BatchNorm input match the
    layer's running statistics; a float32 tensor on the model's device.

    ``on_iteration(i, bn_loss, output_loss)`` is called after each pass over all
    batches with the losses averaged over the batches.  The model is not modified.
    """
    config = config or DataGenConfig()
    shape = _check_shape(shape)
    if not (isinstance(n_images, int) and n_images >= 1):
        raise ValueError(f"generate_data: n_images must be a positive integer, got {n_images!r}")
    device = model_device(model)
    pixels = _Pixels(shape, config, device)
    generator = torch.Generator().manual_seed(config.seed)
    example = pixels.finalize(pixels.initial(1, torch.Generator().manual_seed(config.seed)))
    gm, taps = _prepare(model, leaf_modules, concrete_args, example)
    targets = _Targets(taps, device)
    canvases = pixels.initial(n_images, generator)
    if device.type == "cpu" and len(shape) == 3:  # oneDNN's convolutions (depthwise most) run faster channels-last
        gm = gm.to(memory_format=torch.channels_last)
        canvases = canvases.contiguous(memory_format=torch.channels_last)
    batches = [b.clone().requires_grad_() for b in canvases.split(config.batch_size)]
    optimizers = [config.optimizer([b], lr=config.lr) for b in batches]
    schedulers = [_scheduler(config.scheduler, opt, config.n_iter) for opt in optimizers]
    use_autocast = device.type == "cuda" if config.autocast is None else config.autocast
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if use_autocast
                else contextlib.nullcontext())
    weights = _layer_weights(config.layer_weighting, gm, batches[0], pixels, targets, generator)
    aggregate = None
    if config.granularity is ImageGranularity.ALL_IMAGES:
        aggregate = _Aggregate(len(batches), targets.mean.numel(), device)
        with torch.no_grad(), autocast:
            for i, b in enumerate(batches):
                aggregate.set(i, *_concat(gm(pixels.finalize(b))[1]))
    plateau = config.scheduler in (Scheduler.REDUCE_ON_PLATEAU, Scheduler.REDUCE_ON_PLATEAU_WITH_RESET)
    bar = tqdm(total=config.n_iter, desc="generating data", unit="it", disable=not verbose, leave=False)
    board = TensorBoardLogger(config.log_dir)
    for iteration in range(config.n_iter):
        bn_sum = out_sum = torch.zeros((), device=device)  # summed on the device: one host read per iteration
        order = torch.randperm(len(batches), generator=generator).tolist()
        for index in order:
            x = batches[index]
            with autocast:
                output, stats = gm(pixels.augment(x, generator))
            bn, mean, second = _bn_loss(stats, targets, weights, config.granularity, aggregate, index, n_images)
            out = _output_loss(output, config.output_loss)
            loss = bn + config.output_loss_weight * out
            optimizers[index].zero_grad(set_to_none=True)
            loss.backward()
            optimizers[index].step()
            with torch.no_grad():
                x.copy_(pixels.clip(x))
            if aggregate is not None:
                aggregate.set(index, mean, second)
            value = loss.item()
            if not math.isfinite(value):
                raise FloatingPointError(f"generate_data: the loss became {value} at iteration {iteration} "
                                         f"(batch {index}); lower DataGenConfig.lr (now {config.lr})")
            if plateau:
                schedulers[index].step(value)
            elif schedulers[index] is not None:
                schedulers[index].step()
            bn_sum = bn_sum + bn.detach()
            out_sum = out_sum + (out.detach() if isinstance(out, Tensor) else out)
        bn_mean, out_mean = (float(v) / len(batches) for v in (bn_sum, out_sum))
        if on_iteration is not None:
            on_iteration(iteration, bn_mean, out_mean)
        board.scalar("datagen/bn_loss", bn_mean, iteration)
        board.scalar("datagen/output_loss", out_mean, iteration)
        bar.set_postfix(bn_loss=f"{bn_mean:.4g}", refresh=False)
        bar.update()
    bar.close()
    board.close()
    with torch.no_grad():
        return torch.cat([pixels.finalize(b.detach()) for b in batches]).float().contiguous()


def bn_alignment(model: nn.Module, images: Tensor, batch_size: int = 64, *, leaf_modules: Iterable[type | str] = (),
                 concrete_args: dict[str, Any] | None = None) -> dict[str, float]:
    """Per BatchNorm node: the alignment loss of ``images`` (statistics over all of them) against the layer's
    running statistics, ``|mean - running_mean|^2 / C + |std - running_std|^2 / C``: what data generation
    minimizes (for real data it shows how far the model's statistics are from the data's)."""
    if not isinstance(images, Tensor) or images.dim() < 2 or len(images) == 0:
        raise ValueError("bn_alignment: images must be a non-empty [N, ...] tensor")
    device = model_device(model)
    gm, taps = _prepare(model, leaf_modules, concrete_args)
    targets = _Targets(taps, device)
    mean = second = 0
    with torch.no_grad():
        for chunk in images.split(batch_size):
            m, s = _concat(gm(chunk.to(device))[1])
            mean, second = mean + m.sum(0), second + s.sum(0)
    layers = _layer_losses(mean / len(images), second / len(images), targets)
    return dict(zip(targets.names, layers.tolist(), strict=True))
