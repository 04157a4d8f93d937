"""Post-training quantization: ``quantize`` as a declared list of stages over one run state.

The stages read like DESIGN.md's pipeline line; each says when it runs and
which retained calibration data it reads, so what calibration keeps is
computed from the list.  ``prepare`` (the front half) is :mod:`mct_fx.prepare`.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

from torch import Tensor, fx, nn

from mct_fx.config import CONFIG_KEY, QuantConfig
from mct_fx.data import CalibrationError, ModelInputs, batch_size, iter_batches, loader_length, take_images, to_device
from mct_fx.graph_utils import model_device
from mct_fx.hessian import Granularity, HessianService
from mct_fx.meta import ALIGNMENT, CORRECTION, OPTQ, SUMMARY
from mct_fx.mixed_precision.corrections import expected_correction
from mct_fx.mixed_precision.search import MixedPrecisionResult, MixedPrecisionSearch
from mct_fx.passes.align_pot import alignment_factors, apply_alignment
from mct_fx.passes.bias_correction import correct_biases
from mct_fx.passes.calibrate import calibrate
from mct_fx.passes.freeze import freeze_quantizers
from mct_fx.passes.input_gram import InputGram, observe_input_grams
from mct_fx.passes.layer_inputs import InputMeans, observe_layer_inputs, quantized_layers, remove_observers
from mct_fx.passes.optq_rounding import optq_layers, round_with_optq
from mct_fx.passes.softmax_shift import shift_softmax_inputs
from mct_fx.passes.unify_concat import unify_concat_grids
from mct_fx.passes.weight_correction import BIAS, NONE, correct_weight_errors, has_low_bit_kernels, snapshot
from mct_fx.prepare import TPCLike, prepare
from mct_fx.quant_summary import QuantSummary, summarize
from mct_fx.quantizers.modules import quantizers_off
from mct_fx.quantizers.search import ErrorMethod
from mct_fx.resources import ResourceUtilization
from mct_fx.stages import Stage, retention, run_stages
from mct_fx.tensorboard import TensorBoardLogger
from mct_fx.tpc.builtin import get_tpc
from mct_fx.tpc.matching import annotation
from mct_fx.tpc.schema import TargetPlatformCapabilities

__all__ = ["prepare", "quantize", "summary", "STAGES", "SUMMARY_KEY", "TPCLike"]

log = logging.getLogger("mct_fx")
SUMMARY_KEY, CORRECTION_KEY = SUMMARY, CORRECTION
SECOND_MOMENT_BATCHES = 4  # calibration batches the second-moment correction measures on
HMSE_IMAGES = 32  # calibration images the Hessian of the HMSE error method is estimated on
SIMILARITY_BATCHES = 2  # calibration batches the TensorBoard per-layer similarity is measured on


def quantize(model: nn.Module, calib_loader: Iterable, tpc: TPCLike = "imx500", config: QuantConfig | None = None,
             *, target: ResourceUtilization | None = None, n_batches: int | None = None, inplace: bool = False,
             verbose: bool = True, leaf_modules: Iterable[type | str] = (),
             concrete_args: dict[str, Any] | None = None) -> fx.GraphModule:
    """Post-training quantization of ``model`` for ``tpc``, calibrated on ``calib_loader``.

    With a ``target`` (per-sample bytes / bit operations, see :mod:`mct_fx.resources`),
    mixed precision picks each configurable layer's bit-width among the platform's
    candidates: least sensitivity within the budget (``config.mixed_precision``).
    Returns a ``torch.fx.GraphModule`` with quantizers in the graph; its per-layer
    summary is ``mct_fx.summary(qmodel)`` (also in ``qmodel.meta["mct_fx.summary"]``).
    The user's model is not modified unless ``inplace=True``.
    """
    platform = get_tpc(tpc)  # fail on a bad target before touching any data
    batches = iter_batches(calib_loader, n_batches)
    first = next(batches, None)
    if first is None:  # pragma: no cover - iter_batches raises on an empty loader
        raise CalibrationError("the calibration loader yielded no batches")
    run = _Run(model, platform, config or QuantConfig(), target, first, batches,
               n_batches or loader_length(calib_loader), inplace, verbose, tuple(leaf_modules), concrete_args)
    run_stages("mct_fx.quantize", STAGES, run)
    log.info("quantized with %s on %d calibration batches\n%s", platform.name, run.n_calibrated, run.gm.meta[SUMMARY])
    return run.gm


@dataclass(eq=False)
class _Run:
    """What the stages of one ``quantize`` call read and hand each other."""

    model: nn.Module
    tpc: TargetPlatformCapabilities
    config: QuantConfig
    target: ResourceUtilization | None
    first: ModelInputs  # the first calibration batch (already read: it is the tracing example)
    rest: Iterator[ModelInputs]
    total: int | None  # calibration batches, for the progress bar
    inplace: bool
    verbose: bool
    leaf_modules: tuple
    concrete_args: dict[str, Any] | None
    gm: fx.GraphModule = None  # type: ignore[assignment]
    search: MixedPrecisionSearch | None = None
    observers: dict = field(default_factory=dict)  # layer input observers (bias correction)
    grams: dict[str, InputGram] = field(default_factory=dict)  # layer input second moments (OPTQ)
    retained: list[ModelInputs] = field(default_factory=list)  # the first calibration batches
    n_calibrated: int = 0
    input_means: dict[str, Tensor] = field(default_factory=dict)
    importance: dict[str, Tensor] | None = None  # HMSE: per-element kernel error weights
    mixed: MixedPrecisionResult | None = None

    @cached_property
    def moment_batches(self) -> bool:
        """Whether the second-moment correction may run ("auto": only below 8 bits, where MP may also go)."""
        moments = self.config.weights_second_moment_correction
        if self.config.optq is not None:
            return False
        return moments is True or (moments == "auto" and (self.search is not None or has_low_bit_kernels(self.gm)))

    @cached_property
    def hmse_layers(self) -> list[str]:
        return _hmse_layers(self.gm, self.config)

    @cached_property
    def board(self) -> TensorBoardLogger:
        return TensorBoardLogger(self.config.log_dir)

    @cached_property
    def kept(self) -> list[ModelInputs]:
        """The batches the second-moment correction measures on (none when it cannot run)."""
        device = model_device(self.gm)
        return [to_device(b, device) for b in self.retained[:SECOND_MOMENT_BATCHES]] if self.moment_batches else []


def _prepare(r: _Run) -> None:
    example = r.first[0][0] if r.first[0] and not r.first[1] else r.first[1]
    r.gm = prepare(r.model, example, r.tpc, r.config, leaf_modules=r.leaf_modules, concrete_args=r.concrete_args,
                   inplace=r.inplace)


def _calibrate(r: _Run) -> None:
    keep_batches, keep_images = retention(STAGES, r)
    stream = itertools.chain([r.first], r.rest)
    if keep_batches or keep_images:
        stream = _keep_first(stream, r.retained, keep_batches, keep_images)
    r.n_calibrated = calibrate(r.gm, stream, verbose=r.verbose, total=r.total)


def _observe_inputs(r: _Run) -> None:
    if r.config.weights_bias_correction and r.config.weights_second_moment_correction is not True:
        r.observers = observe_layer_inputs(r.gm)
    if r.config.optq is not None:
        r.grams = observe_input_grams(r.gm, optq_layers(r.gm), r.config.optq.vectors_per_image, r.config.optq.seed)


def _remove_observers(r: _Run) -> None:
    r.input_means = {name: obs.mean() for name, obs in r.observers.items()}
    remove_observers(r.gm, (InputMeans, InputGram))  # one recompile for both kinds


def _align(r: _Run) -> None:
    r.gm.meta[ALIGNMENT] = alignment_factors(r.gm, r.config)
    for name, factor in apply_alignment(r.gm, r.gm.meta[ALIGNMENT]).items():
        if name in r.input_means:
            r.input_means[name] = r.input_means[name] * factor
        if name in r.grams:
            r.grams[name].rescale(factor)


def _correct(r: _Run) -> None:
    r.gm.meta[CORRECTION] = _round_and_correct(r.gm, r.kept, r.input_means, r.grams, r.config)


def _hessians(r: _Run) -> None:
    with quantizers_off(r.gm):
        service = HessianService.from_model_inputs(r.gm, take_images(r.retained, HMSE_IMAGES))
        r.importance = service.weights(r.hmse_layers, Granularity.PER_ELEMENT)


def _mixed_precision(r: _Run) -> None:
    device = model_device(r.gm)
    images = [to_device(b, device) for b in take_images(r.retained, r.config.mixed_precision.n_images)]
    r.mixed, r.gm.meta[CORRECTION] = _search(r.gm, r.search, images, r.kept, r.input_means, r.grams, r.config,
                                             r.verbose, r.importance)


def _summarize(r: _Run) -> None:
    r.gm.meta[SUMMARY] = summarize(r.gm, r.mixed)
    r.gm.meta[CONFIG_KEY] = r.config  # mct_fx.compare prepares the float model the same way


def _moments(r: _Run) -> int:
    return SECOND_MOMENT_BATCHES if r.moment_batches else 0


def _mp(r: _Run) -> bool:
    return r.search is not None


def _no_mp(r: _Run) -> bool:
    return r.search is None


# DESIGN.md's pipeline, in order: (name, run, when, retained batches / images read)
STAGES: tuple[Stage[_Run], ...] = (
    Stage("prepare", _prepare),
    Stage("mixed precision: plan", lambda r: setattr(r, "search", MixedPrecisionSearch(r.gm, r.target, r.config)),
          when=lambda r: r.target is not None),  # configurable nodes, cost model, feasibility: before calibration
    Stage("observe layer inputs", _observe_inputs),
    Stage("calibrate", _calibrate),
    Stage("tensorboard: calibration", lambda r: r.board.calibration(r.gm), when=lambda r: r.board.enabled),
    Stage("remove input observers", _remove_observers),
    Stage("power-of-two alignment", _align, when=lambda r: r.config.power_of_two_alignment),
    Stage("softmax shift", lambda r: shift_softmax_inputs(r.gm), when=lambda r: r.config.softmax_shift),
    Stage("mixed precision: keep histograms", lambda r: r.search.keep_histograms(), when=_mp),
    Stage("HMSE: weight Hessians", _hessians, when=lambda r: bool(r.hmse_layers), images=lambda r: HMSE_IMAGES),
    Stage("freeze", lambda r: freeze_quantizers(r.gm, r.config, r.importance)),
    Stage("mixed precision: search", _mixed_precision, when=_mp, batches=_moments,  # + concat, correction
          images=lambda r: r.config.mixed_precision.n_images),
    Stage("concat unification", lambda r: unify_concat_grids(r.gm),
          when=lambda r: _no_mp(r) and r.config.concat_threshold_update),
    Stage("weight rounding and correction", _correct, when=_no_mp, batches=_moments),  # OPTQ when asked
    Stage("summary", _summarize),
    Stage("tensorboard: result", lambda r: _log_result(r.board, r.model, r.gm, r.retained[:SIMILARITY_BATCHES],
                                                        r.mixed, r.inplace),
          when=lambda r: r.board.enabled, batches=lambda r: SIMILARITY_BATCHES),
)


def _finish(gm: fx.GraphModule, kept: list, input_means: dict[str, Tensor], grams: dict[str, InputGram],
            config: QuantConfig) -> str:
    """Concat grids (when asked), then :func:`_round_and_correct`; returns the correction kept."""
    if config.concat_threshold_update:
        unify_concat_grids(gm)
    return _round_and_correct(gm, kept, input_means, grams, config)


def _round_and_correct(gm: fx.GraphModule, kept: list, input_means: dict[str, Tensor], grams: dict[str, InputGram],
                       config: QuantConfig) -> str:
    """OPTQ rounding (when asked) and the weight-error correction; returns the correction kept."""
    if config.optq is None:
        return correct_weight_errors(gm, kept, input_means, config)
    gm.meta[OPTQ] = report = round_with_optq(gm, grams, config)
    log.info("%s", report)
    if not config.weights_bias_correction:
        return NONE
    correct_biases(gm, {n: m for n, m in input_means.items() if n in report.kept}, config.weights_error_method,
                   config.lp_norm)  # the layers OPTQ kept at the nearest rounding
    return BIAS


def _search(gm: fx.GraphModule, search: MixedPrecisionSearch, images: list, kept: list,
            input_means: dict[str, Tensor], grams: dict[str, InputGram], config: QuantConfig, verbose: bool,
            importance: dict[str, Tensor] | None) -> tuple[MixedPrecisionResult, str]:
    """Mixed precision measured under the correction the result is expected to keep; when the result keeps
    another one (``"auto"`` found bias correction nearer), the search runs again under that one."""
    expected = expected_correction(config, search.entries)
    seconds = 0.0
    while True:
        mixed = search.run(images, input_means, expected, verbose=verbose, importance=importance)
        seconds += mixed.seconds
        log.info("%s", mixed)
        before = snapshot(gm)
        correction = _finish(gm, kept, input_means, grams, config)
        if correction == expected or expected == BIAS:
            return dataclasses.replace(mixed, seconds=seconds), correction
        log.info("mixed precision: the result keeps %s correction, not %s; searching again under it", correction,
                 expected)
        gm.load_state_dict(before)
        search.undo()
        expected = BIAS


def _log_result(board: TensorBoardLogger, model: nn.Module, gm: fx.GraphModule, batches: list, mixed: Any,
                inplace: bool) -> None:
    """TensorBoard: the chosen grids, the bit-widths, the quantized graph and the per-layer similarity."""
    from mct_fx.report import compare

    board.thresholds(gm)
    board.mixed_precision(mixed)
    example, _ = to_device(batches[0], model_device(gm))
    board.graph("3_quantized", gm, example)
    loader = [kwargs or (args[0] if len(args) == 1 else None) for args, kwargs in batches]  # as a loader yields
    if not inplace and None not in loader:  # with inplace=True the float model is gone
        board.similarity(compare(model, gm, loader))
    board.close()


def _hmse_layers(gm: fx.GraphModule, config: QuantConfig) -> list[str]:
    """Layers whose kernel grid the Hessian-weighted MSE chooses (config default or an override)."""
    layers = []
    for layer, _, _ in quantized_layers(gm):
        method = annotation(layer).error_methods.get("weights", config.weights_error_method)
        if method is ErrorMethod.HMSE:
            layers.append(layer.name)
    return layers


def _keep_first(items: Iterable, kept: list, n_batches: int, n_images: int) -> Iterator:
    """Pass ``items`` through, keeping the first ``n_batches`` batches, or more until ``n_images`` images."""
    images = 0
    for item in items:
        if len(kept) < n_batches or images < n_images:
            kept.append(item)
            images += batch_size(item)
        yield item


def summary(qmodel: fx.GraphModule) -> QuantSummary:
    """Per-layer summary of a quantized (or prepared) model."""
    return qmodel.meta.get(SUMMARY_KEY) or summarize(qmodel)
