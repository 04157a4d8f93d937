"""Built-in targets, selectable by name: ``imx500``, ``imx500_16bit``, ``imx500_lut``, ``int8``, ``noquant``."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import replace

from mct_fx.quantizers.params import QuantMethod
from mct_fx.tpc.io import load_tpc
from mct_fx.tpc.schema import (
    AttributeQuantConfig,
    Fusing,
    OperatorSet,
    OpQuantConfig,
    QuantConfigOptions,
    Signedness,
    TargetPlatformCapabilities,
    TPCError,
)
from mct_fx.tpc.vocabulary import ACTIVATION_OPS, POSTPROCESS_OPS

__all__ = ["get_tpc", "BUILTIN_TPCS"]

# Ops that only move or select data: their output keeps the input's grid.
SHAPE_OPS = ("Flatten", "Reshape", "Permute", "Transpose", "Squeeze", "Unsqueeze", "Expand", "GetItem",
             "SplitChunk", "Unstack", "Dropout", "Identity", "Size", "Shape", "Cast")
# Ops whose outputs are not activations to quantize (indices, booleans; detection post-processing, which
# the IMX500 runs on quantized boxes and scores and leaves its outputs float).
NON_NUMERIC_OPS = ("ArgMax", "TopK", "Equal", *POSTPROCESS_OPS)
LINEAR_SETS = ("Conv", "ConvTranspose", "FullyConnected")
RELU_LIKE = ("ReLU", "ReLU6", "LeakyReLU", "HardTanh")
BINARY_OPS = ("Add", "Sub", "Mul", "Div")
FC_ACTIVATIONS = ("ReLU", "ReLU6", "LeakyReLU", "HardTanh", "Swish", "HardSwish", "Sigmoid")

_KERNEL_8 = AttributeQuantConfig(method=QuantMethod.SYMMETRIC, n_bits=8, per_channel=True, enabled=True)


def _build(name: str, activation: QuantMethod, weight_bits: tuple[int, ...], act16: bool,
           simd: int | None, narrow_weights: QuantMethod = QuantMethod.SYMMETRIC) -> TargetPlatformCapabilities:
    """The common shape of the built-in targets (``narrow_weights``: method of the < 8-bit kernels)."""
    default = OpQuantConfig(activation_method=activation, activation_n_bits=8, simd_size=simd,
                            supported_input_activation_n_bits=(8, 16) if act16 else (8,))
    linear_base = replace(default, kernel=_KERNEL_8)
    # Narrower weights pack more values per SIMD lane.
    linear = [replace(linear_base, kernel=replace(_KERNEL_8, n_bits=b, method=narrow_weights if b < 8 else
                                                  _KERNEL_8.method),
                      simd_size=None if simd is None else simd * 8 // b) for b in weight_bits]
    default_candidates = [default]
    if act16:
        linear += [replace(c, activation_n_bits=16, signedness=Signedness.SIGNED) for c in linear]
        default_candidates.append(replace(default, activation_n_bits=16, signedness=Signedness.SIGNED))
    no_quant = OpQuantConfig(activation_method=activation, enable_activation_quantization=False,
                             quantization_preserving=act16, simd_size=simd,
                             supported_input_activation_n_bits=default.supported_input_activation_n_bits)
    shape_sets = SHAPE_OPS + (("MaxPool", "Pad", "ZeroPadding2D") if act16 else ("MaxPool",))
    sets = [OperatorSet(n, QuantConfigOptions((no_quant,))) for n in shape_sets]
    sets += [OperatorSet(n, QuantConfigOptions((replace(no_quant, quantization_preserving=False),)))
             for n in NON_NUMERIC_OPS]
    linear_options = QuantConfigOptions(tuple(linear), base=linear_base)
    sets += [OperatorSet(n, linear_options) for n in LINEAR_SETS]
    sets += [OperatorSet(n) for n in sorted(set(ACTIVATION_OPS + BINARY_OPS))]
    fusing = (
        Fusing((("Conv", "ConvTranspose"), ACTIVATION_OPS)),
        Fusing((("FullyConnected",), FC_ACTIVATIONS)),
        Fusing((BINARY_OPS, RELU_LIKE)),
    )
    default_options = QuantConfigOptions(tuple(default_candidates), base=default)
    return TargetPlatformCapabilities(name=name, default_options=default_options, operator_sets=tuple(sets),
                                      fusing_patterns=fusing)


def imx500() -> TargetPlatformCapabilities:
    """Sony IMX500: symmetric 8-bit per-channel weights (8/4/2 candidates), power-of-two 8-bit activations."""
    return _build("imx500", QuantMethod.POWER_OF_TWO, (8, 4, 2), act16=False, simd=32)


def imx500_16bit() -> TargetPlatformCapabilities:
    """IMX500 with 16-bit activation candidates and quantization-preserving data-movement ops."""
    return _build("imx500_16bit", QuantMethod.POWER_OF_TWO, (8, 4, 2), act16=True, simd=32)


def imx500_lut() -> TargetPlatformCapabilities:
    """IMX500 whose 4- and 2-bit weight candidates are look-up tables (k-means, power-of-two threshold)."""
    return _build("imx500_lut", QuantMethod.POWER_OF_TWO, (8, 4, 2), act16=False, simd=32,
                  narrow_weights=QuantMethod.LUT_POT)


def int8() -> TargetPlatformCapabilities:
    """Generic int8: symmetric per-channel weights, uniform (asymmetric) activations."""
    return _build("int8", QuantMethod.UNIFORM, (8,), act16=False, simd=None)


def noquant() -> TargetPlatformCapabilities:
    """Nothing quantized: the quantized model must equal the float one (a test oracle)."""
    off = OpQuantConfig(enable_activation_quantization=False)
    return TargetPlatformCapabilities(name="noquant", default_options=QuantConfigOptions((off,)))


BUILTIN_TPCS: dict[str, Callable[[], TargetPlatformCapabilities]] = {
    "imx500": imx500, "imx500_16bit": imx500_16bit, "imx500_lut": imx500_lut, "int8": int8, "noquant": noquant,
}


def get_tpc(tpc: str | os.PathLike | TargetPlatformCapabilities) -> TargetPlatformCapabilities:
    """A TPC object from a built-in name, a JSON file path, or a TPC (returned as is)."""
    if isinstance(tpc, TargetPlatformCapabilities):
        return tpc
    if isinstance(tpc, str) and tpc in BUILTIN_TPCS:
        return BUILTIN_TPCS[tpc]()
    if isinstance(tpc, (str, os.PathLike)) and str(tpc).endswith(".json"):
        if not os.path.exists(tpc):
            raise TPCError(f"TPC file {os.fspath(tpc)!r} does not exist")
        return load_tpc(tpc)
    raise TPCError(f"unknown TPC {tpc!r}: use one of {sorted(BUILTIN_TPCS)}, a .json file, "
                   "or a TargetPlatformCapabilities object")
