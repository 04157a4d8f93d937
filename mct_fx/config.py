"""Workflow configuration: one frozen dataclass per workflow, defaults that work."""

from __future__ import annotations

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
    """

    activation_error_method: ErrorMethod = ErrorMethod.MSE
    weights_error_method: ErrorMethod = ErrorMethod.MSE
    lp_norm: float = 2.0
    weights_bias_correction: bool = True
    shift_negative_correction: bool = True
    shift_negative_ratio: float = 0.05

    def __post_init__(self):
        object.__setattr__(self, "activation_error_method", ErrorMethod(self.activation_error_method))
        object.__setattr__(self, "weights_error_method", ErrorMethod(self.weights_error_method))
        if not self.lp_norm > 0:
            raise ValueError(f"lp_norm must be > 0, got {self.lp_norm}")
