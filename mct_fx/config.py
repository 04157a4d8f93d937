"""Workflow configuration: one frozen dataclass per workflow, defaults that work."""

from __future__ import annotations

import enum
import os
from dataclasses import dataclass, field

from mct_fx.meta import CONFIG as CONFIG_KEY
from mct_fx.quantizers.params import QuantMethod
from mct_fx.quantizers.search import ErrorMethod

__all__ = ["QuantConfig", "LayerOverride", "MixedPrecisionConfig", "DistanceWeighting", "OutputDistance",
           "HessianConfig", "OPTQConfig", "CONFIG_KEY"]



@dataclass(frozen=True)
class HessianConfig:
    """``max_iterations`` Rademacher draws at most per batch; stop earlier once the
    running mean of the summed trace moves by less than ``tolerance`` (relative)
    over one draw, after ``min_iterations``; ``seed`` makes the draws repeatable."""

    max_iterations: int = 50
    min_iterations: int = 10
    tolerance: float = 1e-3
    seed: int = 0

    def __post_init__(self):
        if not 1 <= self.min_iterations <= self.max_iterations:
            raise ValueError(f"need 1 <= min_iterations <= max_iterations, got {self.min_iterations}, "
                             f"{self.max_iterations}")
        if not self.tolerance >= 0:
            raise ValueError(f"tolerance must be >= 0, got {self.tolerance}")


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


@dataclass(frozen=True)
class LayerOverride:
    """Manual settings for the nodes it selects (see :mod:`mct_fx.passes.overrides`).

    Selection: ``name`` matches a node name (``layer1_0_conv1``) or module path
    (``layer1.0.conv1``), with ``fnmatch`` wildcards (``features.*``); ``op`` an
    operator set (``"Conv"``, ``"Add"``, see :mod:`mct_fx.tpc.vocabulary`); both
    given: both must match.  Settings left ``None`` keep the target's choice;
    bit-widths must be among the target's candidates for the node.
    """

    name: str | None = None
    op: str | None = None
    activation_n_bits: int | None = None
    weights_n_bits: int | None = None
    activation_method: QuantMethod | None = None
    activation_error_method: ErrorMethod | None = None
    weights_error_method: ErrorMethod | None = None

    def __post_init__(self):
        if self.name is None and self.op is None:
            raise ValueError("LayerOverride: give name= and/or op= to select nodes")
        for attr in ("activation_method", "activation_error_method", "weights_error_method"):
            value = getattr(self, attr)
            if value is not None:
                kind = QuantMethod if attr == "activation_method" else ErrorMethod
                try:
                    object.__setattr__(self, attr, kind(value))
                except ValueError:
                    raise ValueError(f"LayerOverride.{attr}: unknown value {value!r}; "
                                     f"expected one of {[m.value for m in kind]}") from None
        if self.activation_error_method is ErrorMethod.HMSE:
            raise ValueError("LayerOverride.activation_error_method: HMSE applies to weights only")
        for attr in ("activation_n_bits", "weights_n_bits"):
            bits = getattr(self, attr)
            if bits is not None and (isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 16):
                raise ValueError(f"LayerOverride.{attr}: expected a bit-width in 2..16, got {bits!r}")

    def describe(self) -> str:
        sel = ", ".join(f"{k}={getattr(self, k)!r}" for k in ("name", "op") if getattr(self, k) is not None)
        return f"LayerOverride({sel})"


@dataclass(frozen=True)
class OPTQConfig:
    """OPTQ rounding of the kernels (``QuantConfig(optq=OPTQConfig())``, see :mod:`mct_fx.passes.optq_rounding`).

    ``vectors_per_image``: input vectors each calibration image contributes to
    a layer's input second moment (a convolution has one per output position; a
    random sample estimates the moment as well as all of them at a fraction of
    the cost: on the detection benchmark 4, 8 and 32 gave the same mAP within
    noise); ``damp``: fraction of the mean diagonal added to the moment's
    diagonal; ``block_size``: columns rounded between two matrix updates (speed
    only); ``act_order``: round the inputs with the most energy first; ``seed``
    for the sampling.
    """

    vectors_per_image: int = 8
    damp: float = 0.01
    block_size: int = 128
    act_order: bool = True
    seed: int = 0

    def __post_init__(self):
        if self.vectors_per_image < 1:
            raise ValueError(f"OPTQConfig.vectors_per_image must be >= 1, got {self.vectors_per_image}")
        if not 0 < self.damp < 1:
            raise ValueError(f"OPTQConfig.damp must be in (0, 1), got {self.damp}")
        if self.block_size < 1:
            raise ValueError(f"OPTQConfig.block_size must be >= 1, got {self.block_size}")


@dataclass(frozen=True)
class QuantConfig:
    """Post-training quantization settings.

    ``activation_error_method`` / ``weights_error_method``: what the grid search
    minimises (see :class:`ErrorMethod`); ``lp_norm``: p of the ``LP`` method;
    ``weights_bias_correction``: fold the mean output shift that weight
    quantization causes back into the biases; ``shift_negative_correction``:
    activations with a small negative tail (SiLU, Hardswish, GELU, ...) feeding
    linear layers get a shifted unsigned grid when the tail is at most
    ``shift_negative_ratio`` of the threshold; ``weights_second_moment_correction``
    gives each layer's output, with quantized weights, the float per-channel mean
    and variance (measured on the first calibration batches) instead of only the
    mean; ``"auto"`` (default): when a kernel has fewer than 8 bits, apply each of
    the two corrections and keep the one whose outputs on those batches are nearer
    the float model's (see :mod:`mct_fx.passes.weight_correction`; mixed precision measures
    its candidates under the correction the result is expected to keep, see
    :mod:`mct_fx.mixed_precision.corrections`); ``shift_negative_params_search``
    searches that grid's threshold and shift together instead of keeping the
    signed search's threshold.

    Graph rewrites before calibration (float function unchanged):
    ``linear_collapsing`` merges conv -> 1x1 conv, linear -> linear and layer -> + constant
    into one layer; ``residual_collapsing`` folds ``conv(x) + x`` into the kernel;
    ``relu_bound_to_power_of_2`` rescales ``layer -> ReLU6 -> layer`` so the bound is 8;
    ``activation_channel_equalization`` balances channel ranges across
    ``layer -> ReLU -> layer`` (statistics from the first calibration batch).

    Around the threshold search: ``z_threshold`` drops activation values further
    than this many standard deviations from the mean (outliers; ``inf``: off);
    ``power_of_two_alignment`` rescales ``layer -> ReLU/ReLU6 -> layers`` chains
    after calibration so that each power-of-two activation grid sits on the
    tensor's best unconstrained threshold (float function and weight grids
    unchanged; see :mod:`mct_fx.passes.align_pot`).
    Four defaults differ from MCT's because they measured better (see
    ``benchmarks/results/ablation.md``): ``z_threshold=16`` (ImageNet MobileNetV2
    W8A8 top-1 agreement 69.5 -> 77.0 %, neutral on the Fashion-MNIST models and
    the random-weight zoo), ``relu_bound_to_power_of_2=True`` and
    ``power_of_two_alignment=True`` (MobileNetV2 77.0 -> 80.9 %),
    ``weights_second_moment_correction="auto"`` (Fashion-MNIST ResNet W4A8 test
    accuracy 85.9 -> 88.5 %; MCT: off);
    ``softmax_shift`` recentres the logits a softmax reads through the bias before
    it; ``concat_threshold_update`` puts a concat's inputs on the concat's grid.

    ``optq``: choose each kernel's rounding on its grid with OPTQ (an
    :class:`OPTQConfig`: Frantar et al.'s one-shot GPTQ, error feedback through
    the second moment of the layer's calibration inputs, gathered during
    calibration) instead of rounding to nearest; bias correction then follows
    OPTQ's rounding and the second-moment correction does not run (``"auto"``
    reads as off; ``True`` is refused).  Seconds, where :func:`mct_fx.gptq` trains.

    ``overrides``: per-node bit-widths (e.g. 16-bit activations where the target
    offers them), schemes and error methods, as :class:`LayerOverride` items.

    ``mixed_precision``: settings of the bit-width search that ``quantize(..., target=...)`` runs.

    ``log_dir``: write TensorBoard logs there (graphs per stage, calibration
    histograms, thresholds, per-layer similarity, mixed-precision choice, GPTQ
    losses; see :mod:`mct_fx.tensorboard`).
    """

    activation_error_method: ErrorMethod = ErrorMethod.MSE
    weights_error_method: ErrorMethod = ErrorMethod.MSE
    lp_norm: float = 2.0
    weights_bias_correction: bool = True
    weights_second_moment_correction: bool | str = "auto"
    shift_negative_correction: bool = True
    shift_negative_ratio: float = 0.05
    shift_negative_params_search: bool = False
    linear_collapsing: bool = True
    residual_collapsing: bool = True
    relu_bound_to_power_of_2: bool = True
    power_of_two_alignment: bool = True
    activation_channel_equalization: bool = False
    z_threshold: float = 16.0
    softmax_shift: bool = False
    concat_threshold_update: bool = False
    optq: OPTQConfig | None = None
    overrides: tuple[LayerOverride, ...] = ()
    mixed_precision: MixedPrecisionConfig = MixedPrecisionConfig()
    log_dir: str | None = None

    def __post_init__(self):
        object.__setattr__(self, "activation_error_method", ErrorMethod(self.activation_error_method))
        object.__setattr__(self, "weights_error_method", ErrorMethod(self.weights_error_method))
        object.__setattr__(self, "overrides", tuple(self.overrides))
        for i, o in enumerate(self.overrides):
            if not isinstance(o, LayerOverride):
                raise TypeError(f"overrides[{i}]: expected a LayerOverride, got {type(o).__name__}")
        if self.activation_error_method is ErrorMethod.HMSE:
            raise ValueError("activation_error_method: HMSE (Hessian-weighted MSE) applies to weights only")
        if self.weights_second_moment_correction not in (True, False, "auto"):
            raise ValueError("weights_second_moment_correction: expected True, False or 'auto', got "
                             f"{self.weights_second_moment_correction!r}")
        if self.optq is not None and not isinstance(self.optq, OPTQConfig):
            raise TypeError(f"optq: expected an OPTQConfig or None, got {type(self.optq).__name__}")
        if self.optq is not None and self.weights_second_moment_correction is True:
            raise ValueError("weights_second_moment_correction=True with optq: OPTQ chooses the rounding and bias "
                             "correction follows it; the second-moment correction would rescale its weights off "
                             "the grid (leave it 'auto' or False)")
        if not self.lp_norm > 0:
            raise ValueError(f"lp_norm must be > 0, got {self.lp_norm}")
        if not self.z_threshold > 0:
            raise ValueError(f"z_threshold must be > 0 (inf: off), got {self.z_threshold}")
        if self.log_dir is not None:
            if not isinstance(self.log_dir, str | os.PathLike):
                raise TypeError(f"log_dir must be a path, got {type(self.log_dir).__name__}")
            object.__setattr__(self, "log_dir", os.fspath(self.log_dir))
        if not 0 < self.shift_negative_ratio < 1:
            raise ValueError(f"shift_negative_ratio must be in (0, 1), got {self.shift_negative_ratio}")
