"""Quantization primitives (pure functions) and the quantizer modules built on them."""

from mct_fx.quantizers.histogram import StreamingHistogram
from mct_fx.quantizers.lut import LutActivationQuantizer, LutWeightQuantizer
from mct_fx.quantizers.modules import ActivationQuantizer, FakeQuantizer, WeightQuantizer
from mct_fx.quantizers.params import QuantMethod, int_range, pot_threshold, symmetric_params, uniform_params
from mct_fx.quantizers.search import ErrorMethod, quant_error, search_params

__all__ = [
    "QuantMethod", "ErrorMethod", "int_range", "pot_threshold", "symmetric_params", "uniform_params",
    "search_params", "quant_error", "StreamingHistogram", "FakeQuantizer", "ActivationQuantizer",
    "WeightQuantizer", "LutWeightQuantizer", "LutActivationQuantizer",
]
