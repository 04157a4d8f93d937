"""Mixed-precision bit-width search: sensitivities, an integer program under a resource budget."""

from mct_fx.config import DistanceWeighting, MixedPrecisionConfig, OutputDistance

__all__ = ["MixedPrecisionConfig", "DistanceWeighting", "OutputDistance"]
