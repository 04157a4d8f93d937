"""Target Platform Capabilities: what the hardware can run, as frozen dataclasses.

A TPC says, per operator set (a name from :mod:`mct_fx.tpc.vocabulary`), which
quantization configurations the hardware supports (``candidates``; mixed
precision chooses among them, everything else uses ``base``), and which
operator chains the hardware fuses (only a fused group's output is quantized).
Every object validates itself on construction; :mod:`mct_fx.tpc.io` turns them
into JSON and back.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from mct_fx.quantizers.params import MAX_LUT_BITS, QuantMethod

__all__ = [
    "TPCError",
    "Signedness",
    "AttributeQuantConfig",
    "OpQuantConfig",
    "QuantConfigOptions",
    "OperatorSet",
    "Fusing",
    "TargetPlatformCapabilities",
]


class TPCError(ValueError):
    """An invalid target description; the message names the bad field."""


class Signedness(str, enum.Enum):
    """Whether an activation grid is signed: decided from the data (AUTO) or forced."""

    AUTO = "auto"
    SIGNED = "signed"
    UNSIGNED = "unsigned"


def _check_bits(where: str, n_bits: int) -> None:
    if isinstance(n_bits, bool) or not isinstance(n_bits, int) or not 2 <= n_bits <= 16:
        raise TPCError(f"{where}: expected an integer bit-width in 2..16, got {n_bits!r}")


@dataclass(frozen=True)
class AttributeQuantConfig:
    """How one weight attribute (kernel, bias) is quantized."""

    method: QuantMethod = QuantMethod.SYMMETRIC
    n_bits: int = 8
    per_channel: bool = True
    enabled: bool = False

    def __post_init__(self):
        object.__setattr__(self, "method", QuantMethod(self.method))
        _check_bits("n_bits", self.n_bits)
        _check_lut_bits("n_bits", self.method, self.n_bits)


def _check_lut_bits(where: str, method: QuantMethod, n_bits: int) -> None:
    if method.is_lut and n_bits > MAX_LUT_BITS:
        raise TPCError(f"{where}: look-up-table methods take 2..{MAX_LUT_BITS} bits (an 8-bit table), got {n_bits}")


_DISABLED = AttributeQuantConfig(enabled=False)


@dataclass(frozen=True)
class OpQuantConfig:
    """One quantization configuration an operator supports."""

    activation_method: QuantMethod = QuantMethod.POWER_OF_TWO
    activation_n_bits: int = 8
    enable_activation_quantization: bool = True
    signedness: Signedness = Signedness.AUTO
    # The output reuses its input's grid (shape ops, max-pool): no quantizer of its own.
    quantization_preserving: bool = False
    supported_input_activation_n_bits: tuple[int, ...] = (8,)
    kernel: AttributeQuantConfig = _DISABLED
    bias: AttributeQuantConfig = _DISABLED
    simd_size: int | None = None

    def __post_init__(self):
        object.__setattr__(self, "activation_method", QuantMethod(self.activation_method))
        object.__setattr__(self, "signedness", Signedness(self.signedness))
        object.__setattr__(self, "supported_input_activation_n_bits",
                           tuple(self.supported_input_activation_n_bits))
        _check_bits("activation_n_bits", self.activation_n_bits)
        _check_lut_bits("activation_n_bits", self.activation_method, self.activation_n_bits)
        if not self.supported_input_activation_n_bits:
            raise TPCError("supported_input_activation_n_bits: must list at least one bit-width")
        for i, b in enumerate(self.supported_input_activation_n_bits):
            _check_bits(f"supported_input_activation_n_bits[{i}]", b)
        if self.simd_size is not None and (not isinstance(self.simd_size, int) or self.simd_size < 1):
            raise TPCError(f"simd_size: expected a positive integer or null, got {self.simd_size!r}")
        if self.quantization_preserving and self.enable_activation_quantization:
            raise TPCError("quantization_preserving: a preserving op cannot also quantize its activation")


@dataclass(frozen=True)
class QuantConfigOptions:
    """The configurations an operator set may use; ``base`` is the one used without mixed precision."""

    candidates: tuple[OpQuantConfig, ...]
    base: OpQuantConfig | None = None

    def __post_init__(self):
        object.__setattr__(self, "candidates", tuple(self.candidates))
        if not self.candidates:
            raise TPCError("candidates: must hold at least one configuration")
        if self.base is None:
            if len(self.candidates) > 1:
                raise TPCError("base: required when there is more than one candidate")
            object.__setattr__(self, "base", self.candidates[0])
        elif self.base not in self.candidates:
            raise TPCError("base: must be one of the candidates")


@dataclass(frozen=True)
class OperatorSet:
    """A named set of operators; ``options`` None means the TPC's default options."""

    name: str
    options: QuantConfigOptions | None = None

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name:
            raise TPCError(f"name: expected a non-empty string, got {self.name!r}")


@dataclass(frozen=True)
class Fusing:
    """Operators the hardware runs as one: each position lists the operator sets allowed there."""

    groups: tuple[tuple[str, ...], ...]

    def __post_init__(self):
        groups = tuple(tuple(g) if isinstance(g, (tuple, list)) else (g,) for g in self.groups)
        object.__setattr__(self, "groups", groups)
        if len(groups) < 2:
            raise TPCError(f"groups: a fusing pattern needs at least two positions, got {len(groups)}")


@dataclass(frozen=True)
class TargetPlatformCapabilities:
    """A hardware target: default options, operator sets, fusing patterns."""

    name: str
    default_options: QuantConfigOptions
    operator_sets: tuple[OperatorSet, ...] = ()
    fusing_patterns: tuple[Fusing, ...] = ()
    version: str = "1.0"
    _by_name: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self):
        object.__setattr__(self, "operator_sets", tuple(self.operator_sets))
        object.__setattr__(self, "fusing_patterns", tuple(self.fusing_patterns))
        for i, s in enumerate(self.operator_sets):
            if s.name in self._by_name:
                raise TPCError(f"operator_sets[{i}].name: duplicate operator set {s.name!r}")
            self._by_name[s.name] = s
        for i, f in enumerate(self.fusing_patterns):
            for j, g in enumerate(f.groups):
                for name in g:
                    if name not in self._by_name:
                        raise TPCError(f"fusing_patterns[{i}].groups[{j}]: unknown operator set {name!r}")

    def has(self, op: str) -> bool:
        return op in self._by_name

    def options_for(self, op: str | None) -> QuantConfigOptions:
        """Options of operator set ``op`` (the default options when it has none or is not listed)."""
        s = self._by_name.get(op) if op is not None else None
        return s.options if s is not None and s.options is not None else self.default_options
