"""Mixed-precision search settings (part of :class:`mct_fx.QuantConfig`)."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from mct_fx.hessian import HessianConfig

__all__ = ["MixedPrecisionConfig", "DistanceWeighting", "OutputDistance"]


class DistanceWeighting(str, enum.Enum):
    """How interest-point distances combine: their mean; none (outputs only); weights ``1 - exp(-d / 0.1)``
    (points that moved count more); the points' activation Hessian traces."""

    AVG = "avg"
    LAST_LAYER = "last_layer"
    EXP = "exp"
    HESSIAN = "hessian"


class OutputDistance(str, enum.Enum):
    AUTO = "auto"
    MSE = "mse"
    KL = "kl"
    COSINE = "cosine"


@dataclass(frozen=True)
class MixedPrecisionConfig:
    """``n_images``: calibration images the sensitivities are measured on (the first ones);
    ``distance_weighting``: how interest points combine (:class:`DistanceWeighting`);
    ``output_distance``: distance on the model outputs (``auto``: KL after a softmax,
    cosine after an L2 normalization, normalized MSE otherwise); ``refine``:
    after the integer program, raise bits where the budget allows and sensitivity
    does not grow; ``hessian``: estimator settings for Hessian weighting."""

    n_images: int = 32
    distance_weighting: DistanceWeighting = DistanceWeighting.AVG
    output_distance: OutputDistance = OutputDistance.AUTO
    refine: bool = True
    hessian: HessianConfig = field(default_factory=HessianConfig)

    def __post_init__(self):
        object.__setattr__(self, "distance_weighting", DistanceWeighting(self.distance_weighting))
        object.__setattr__(self, "output_distance", OutputDistance(self.output_distance))
        if isinstance(self.n_images, bool) or not isinstance(self.n_images, int) or self.n_images < 1:
            raise ValueError(f"MixedPrecisionConfig.n_images: expected a positive integer, got {self.n_images!r}")
