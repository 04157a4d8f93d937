"""Workflow configuration: one frozen dataclass per workflow, defaults that work."""

from __future__ import annotations

import math
from dataclasses import dataclass

from mct_fx.quantizers.search import ErrorMethod

__all__ = ["QuantConfig"]


@dataclass(frozen=True)
class QuantConfig:
    """Post-training quantization settings.

    ``activation_error_method`` / ``weights_error_method``: what the grid search
    minimises (see :class:`ErrorMethod`); ``lp_norm``: p of the ``LP`` method;
    ``weights_bias_correction``: fold the mean output shift that weight
    quantization causes back into the biases; ``shift_negative_correction``:
    activations with a small negative tail (SiLU, Hardswish, GELU, ...) feeding
    linear layers get a shifted unsigned grid when the tail is at most
    ``shift_negative_ratio`` of the threshold.

    Graph rewrites before calibration (float function unchanged):
    ``linear_collapsing`` merges conv -> 1x1 conv, linear -> linear and layer -> + constant
    into one layer; ``residual_collapsing`` folds ``conv(x) + x`` into the kernel;
    ``relu_bound_to_power_of_2`` rescales ``layer -> ReLU6 -> layer`` so the bound is 8.

    Around the threshold search: ``z_threshold`` drops activation values further
    than this many standard deviations from the mean (outliers; ``inf``: off);
    ``softmax_shift`` recentres the logits a softmax reads through the bias before
    it; ``concat_threshold_update`` puts a concat's inputs on the concat's grid.
    """

    activation_error_method: ErrorMethod = ErrorMethod.MSE
    weights_error_method: ErrorMethod = ErrorMethod.MSE
    lp_norm: float = 2.0
    weights_bias_correction: bool = True
    shift_negative_correction: bool = True
    shift_negative_ratio: float = 0.05
    linear_collapsing: bool = True
    residual_collapsing: bool = True
    relu_bound_to_power_of_2: bool = False
    z_threshold: float = math.inf
    softmax_shift: bool = False
    concat_threshold_update: bool = False

    def __post_init__(self):
        object.__setattr__(self, "activation_error_method", ErrorMethod(self.activation_error_method))
        object.__setattr__(self, "weights_error_method", ErrorMethod(self.weights_error_method))
        if not self.lp_norm > 0:
            raise ValueError(f"lp_norm must be > 0, got {self.lp_norm}")
        if not self.z_threshold > 0:
            raise ValueError(f"z_threshold must be > 0 (inf: off), got {self.z_threshold}")
        if not 0 < self.shift_negative_ratio < 1:
            raise ValueError(f"shift_negative_ratio must be in (0, 1), got {self.shift_negative_ratio}")
