"""The weight-error correction a quantized model keeps: bias correction or second-moment correction.

Bias correction (:mod:`.bias_correction`) restores each layer's float output mean;
second-moment correction (:mod:`.second_moment`) its per-channel mean and variance.
At 8 bits they differ little (within 0.7 dB of logit SQNR on the three benchmark
models, ``benchmarks/results/ablation.md``).  Below 8 bits neither wins
everywhere: at W4A8 the variance match raises the Fashion-MNIST ResNet's logit SQNR
from 11.5 to 15.7 dB (test accuracy 85.9 -> 88.5 %) but lowers ImageNet MobileNetV2's
from 5.7 to 5.0 dB.  So with ``weights_second_moment_correction="auto"`` and a kernel
below 8 bits, both are applied in turn and the model keeps the one whose outputs on
the first 32 retained calibration images are nearer the float model's (on MobileNetV2
the calibration images rank the two as its test set does).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, fx
from torch.utils._pytree import tree_leaves

from mct_fx.config import QuantConfig
from mct_fx.data import take_images
from mct_fx.passes.bias_correction import correct_biases
from mct_fx.passes.layer_inputs import quantized_layers
from mct_fx.passes.second_moment import correct_second_moments
from mct_fx.quantizers.modules import quantizers_off

__all__ = ["correct_weight_errors", "has_low_bit_kernels", "snapshot", "BIAS", "SECOND_MOMENT", "NONE"]

BIAS, SECOND_MOMENT, NONE = "bias", "second-moment", "none"
COMPARE_IMAGES = 32  # the two corrected models are compared on this many of the retained images


def has_low_bit_kernels(gm: fx.GraphModule) -> bool:
    """Some quantized kernel has fewer than 8 bits (where the choice of correction matters)."""
    return any(q.n_bits < 8 for _, _, q in quantized_layers(gm))


def correct_weight_errors(gm: fx.GraphModule, batches: Sequence[tuple[tuple, dict]],
                          input_means: dict[str, Tensor], config: QuantConfig) -> str:
    """Correct the frozen model's layers for their weight errors, per ``config``; returns the correction kept.

    ``batches``: the retained calibration batches ``(args, kwargs)`` on the model's
    device (the second-moment pass measures on them, ``auto`` compares on them);
    ``input_means``: per layer, its input's mean (bias correction; empty: off).
    """
    mode = config.weights_second_moment_correction
    if mode is True:
        correct_second_moments(gm, batches)
        return SECOND_MOMENT
    if mode == "auto" and batches and has_low_bit_kernels(gm):
        return _keep_nearer(gm, batches, input_means, config)
    return _correct_biases(gm, input_means, config)


def _correct_biases(gm: fx.GraphModule, input_means: dict[str, Tensor], config: QuantConfig) -> str:
    if not input_means:
        return NONE
    correct_biases(gm, input_means, config.weights_error_method, config.lp_norm)
    return BIAS


def _keep_nearer(gm: fx.GraphModule, batches: Sequence[tuple[tuple, dict]], input_means: dict[str, Tensor],
                 config: QuantConfig) -> str:
    probe = take_images(list(batches), COMPARE_IMAGES)
    with torch.no_grad(), quantizers_off(gm):
        reference = [_outputs(gm, b) for b in probe]
    start = snapshot(gm)
    correct_second_moments(gm, batches)
    error = _error(gm, probe, reference)
    moments = snapshot(gm)
    gm.load_state_dict(start)
    kept = _correct_biases(gm, input_means, config)
    if error < _error(gm, probe, reference):
        gm.load_state_dict(moments)
        kept = SECOND_MOMENT
    return kept


def snapshot(gm: fx.GraphModule) -> dict:
    """A copy of ``gm``'s state, for ``load_state_dict`` to undo changes to parameters and grids."""
    return {k: v.detach().clone() if isinstance(v, Tensor) else v for k, v in gm.state_dict().items()}


def _outputs(gm: fx.GraphModule, batch: tuple[tuple, dict]) -> list[Tensor]:
    args, kwargs = batch
    return [o.detach().double() for o in tree_leaves(gm(*args, **kwargs))
            if isinstance(o, Tensor) and o.is_floating_point()]


def _error(gm: fx.GraphModule, batches: Sequence[tuple[tuple, dict]], reference: list[list[Tensor]]) -> float:
    """Squared distance of the model's outputs from ``reference``, summed over outputs and batches."""
    total = 0.0
    with torch.no_grad():
        for batch, ref in zip(batches, reference, strict=True):
            total += sum(float((o - r).square().sum()) for o, r in zip(_outputs(gm, batch), ref, strict=True))
    return total
