"""mct_fx: PyTorch-native model compression on torch.fx graphs."""

from mct_fx import tpc
from mct_fx.config import LayerOverride, OPTQConfig, QuantConfig
from mct_fx.convert_imx500 import ConversionError, Imx500Package, MemoryReport, convert_imx500
from mct_fx.data import CalibrationError
from mct_fx.datagen import (
    DataGenConfig,
    DataInit,
    ImageGranularity,
    LayerWeighting,
    OutputLoss,
    Scheduler,
    bn_alignment,
    generate_data,
)
from mct_fx.export import ExportError, ExportResult, export_onnx
from mct_fx.export_imx500 import Imx500ExportResult, export_imx500
from mct_fx.gptq import GPTQConfig, GPTQReport, LossWeighting, Rounding, gptq
from mct_fx.hessian import Granularity, HessianConfig, HessianService
from mct_fx.kernels import backend
from mct_fx.mixed_precision import DistanceWeighting, MixedPrecisionConfig, OutputDistance
from mct_fx.mixed_precision.solver import MixedPrecisionError
from mct_fx.passes.optq_rounding import OPTQReport
from mct_fx.prepare import resource_utilization
from mct_fx.pruning import Importance, PruningConfig, PruningInfo, prune
from mct_fx.ptq import prepare, quantize, summary
from mct_fx.qat import QATConfig, QATMethod, qat_finalize, qat_prepare
from mct_fx.quantizers import ActivationQuantizer, ErrorMethod, QuantMethod, WeightQuantizer
from mct_fx.report import Comparison, compare
from mct_fx.resources import ResourceUtilization
from mct_fx.tpc import Signedness, TargetPlatformCapabilities, TPCError, get_tpc, load_tpc, save_tpc
from mct_fx.trace import TraceError, trace
from mct_fx.troubleshoot import TroubleshootConfig, TroubleshootReport, troubleshoot

__version__ = "0.1.0"

__all__ = [
    "quantize", "prepare", "summary", "trace", "QuantConfig", "LayerOverride", "ErrorMethod", "QuantMethod",
    "Signedness",
    "ActivationQuantizer", "WeightQuantizer", "TargetPlatformCapabilities", "get_tpc", "load_tpc", "save_tpc",
    "TraceError", "CalibrationError", "TPCError", "backend", "tpc", "export_onnx", "ExportError", "ExportResult",
    "export_imx500", "Imx500ExportResult", "convert_imx500", "Imx500Package", "MemoryReport", "ConversionError",
    "ResourceUtilization", "resource_utilization", "MixedPrecisionConfig", "MixedPrecisionError", "DistanceWeighting",
    "OutputDistance", "HessianService", "HessianConfig", "Granularity", "gptq", "GPTQConfig", "GPTQReport",
    "OPTQConfig", "OPTQReport",
    "Rounding", "LossWeighting", "qat_prepare", "qat_finalize", "QATConfig", "QATMethod", "prune", "PruningConfig",
    "PruningInfo", "Importance", "generate_data", "bn_alignment", "DataGenConfig", "DataInit", "ImageGranularity",
    "LayerWeighting", "OutputLoss", "Scheduler", "compare", "Comparison", "troubleshoot", "TroubleshootConfig",
    "TroubleshootReport",
]
