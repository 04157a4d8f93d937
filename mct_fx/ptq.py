"""Post-training quantization: ``prepare`` (trace, graph passes, quantizers) and ``quantize``."""

from __future__ import annotations

import dataclasses
import itertools
import logging
import os
from collections.abc import Iterable, Iterator
from typing import Any

from torch import Tensor, fx, nn

from mct_fx.config import CONFIG_KEY, QuantConfig
from mct_fx.data import CalibrationError, batch_size, iter_batches, loader_length, split_batch, take_images, to_device
from mct_fx.graph_utils import model_device
from mct_fx.hessian import Granularity, HessianService
from mct_fx.meta import CORRECTION, SUMMARY
from mct_fx.mixed_precision.corrections import expected_correction
from mct_fx.mixed_precision.search import MixedPrecisionResult, MixedPrecisionSearch
from mct_fx.passes.align_pot import ALIGNMENT_KEY, alignment_factors, apply_alignment
from mct_fx.passes.bias_correction import add_missing_biases
from mct_fx.passes.calibrate import calibrate
from mct_fx.passes.collapse_linear import collapse_linear_layers
from mct_fx.passes.collapse_residual import collapse_residuals
from mct_fx.passes.equalize_channels import equalize_channels
from mct_fx.passes.fold_bn import fold_batchnorm
from mct_fx.passes.freeze import freeze_quantizers
from mct_fx.passes.functionalize import functionalize_layers
from mct_fx.passes.insert_quantizers import insert_quantizers
from mct_fx.passes.layer_inputs import observe_layer_inputs, quantized_layers, remove_observers
from mct_fx.passes.overrides import apply_overrides
from mct_fx.passes.relu_bound import bound_relus_to_power_of_two
from mct_fx.passes.softmax_shift import shift_softmax_inputs
from mct_fx.passes.unify_concat import unify_concat_grids
from mct_fx.passes.weight_correction import BIAS, correct_weight_errors, has_low_bit_kernels, snapshot
from mct_fx.quant_summary import QuantSummary, summarize
from mct_fx.quantizers.modules import quantizers_off
from mct_fx.quantizers.search import ErrorMethod
from mct_fx.resources import ResourceUtilization
from mct_fx.tensorboard import TensorBoardLogger
from mct_fx.tpc.builtin import get_tpc
from mct_fx.tpc.matching import annotate, annotation, describe_target
from mct_fx.tpc.schema import TargetPlatformCapabilities
from mct_fx.trace import trace

__all__ = ["prepare", "quantize", "SUMMARY_KEY"]

log = logging.getLogger("mct_fx")
SUMMARY_KEY, CORRECTION_KEY = SUMMARY, CORRECTION
SECOND_MOMENT_BATCHES = 4  # calibration batches the second-moment correction measures on
HMSE_IMAGES = 32  # calibration images the Hessian of the HMSE error method is estimated on
SIMILARITY_BATCHES = 2  # calibration batches the TensorBoard per-layer similarity is measured on
TPCLike = str | os.PathLike | TargetPlatformCapabilities


def prepare(model: nn.Module, example_batch: Any, tpc: TPCLike = "imx500", config: QuantConfig | None = None, *,
            leaf_modules: Iterable[type | str] = (), concrete_args: dict[str, Any] | None = None,
            inplace: bool = False) -> fx.GraphModule:
    """Trace ``model``, fold BN, annotate from ``tpc`` and insert quantizers (observing, not yet calibrated).

    ``example_batch`` is one item as a calibration loader yields it.  Loading a
    quantized model's ``state_dict`` into the result reproduces that model.
    """
    target = get_tpc(tpc)
    config = config or QuantConfig()
    inputs = to_device(split_batch(example_batch, 0), model_device(model))
    gm = trace(model, inputs, leaf_modules=leaf_modules,
               concrete_args=concrete_args, inplace=inplace)
    board = TensorBoardLogger(config.log_dir)
    board.graph("1_traced", gm, inputs[0])
    functionalize_layers(gm)
    fold_batchnorm(gm)
    if config.linear_collapsing:
        collapse_linear_layers(gm)
    if config.residual_collapsing:
        collapse_residuals(gm)
    if config.activation_channel_equalization:
        equalize_channels(gm, inputs)
    board.graph("2_passes", gm, inputs[0])
    board.close()
    unknown = annotate(gm, target)
    for node in unknown:
        log.info("node %s (%s): op not in the vocabulary, left float", node.name, describe_target(node, gm))
    apply_overrides(gm, config.overrides)
    if config.relu_bound_to_power_of_2:
        bound_relus_to_power_of_two(gm)
    insert_quantizers(gm)
    if config.weights_bias_correction or config.weights_second_moment_correction or config.softmax_shift:
        add_missing_biases(gm)  # the corrections write biases: a prepared model has the same state_dict keys
    gm.meta["mct_fx.tpc"] = target.name
    return gm


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
    config = config or QuantConfig()
    platform = get_tpc(tpc)  # fail on a bad target before touching any data
    batches = iter_batches(calib_loader, n_batches)
    first = next(batches, None)
    if first is None:  # pragma: no cover - iter_batches raises on an empty loader
        raise CalibrationError("the calibration loader yielded no batches")
    args, kwargs = first
    example = args[0] if args and not kwargs else kwargs
    gm = prepare(model, example, platform, config, leaf_modules=leaf_modules, concrete_args=concrete_args,
                 inplace=inplace)
    search = MixedPrecisionSearch(gm, target, config) if target is not None else None  # fails early on a bad budget
    moments = config.weights_second_moment_correction
    bias_correction = config.weights_bias_correction and moments is not True
    observers = observe_layer_inputs(gm) if bias_correction else {}
    total = n_batches or loader_length(calib_loader)
    retained: list = []  # the first batches: for the second-moment pass and the mixed-precision sensitivities
    stream = itertools.chain([first], batches)
    # "auto" only acts below 8 bits (where the search may also put layers)
    moment_batches = moments is True or (moments == "auto" and (search is not None or has_low_bit_kernels(gm)))
    keep_batches = SECOND_MOMENT_BATCHES if moment_batches else 0
    if config.log_dir is not None:
        keep_batches = max(keep_batches, SIMILARITY_BATCHES)
    keep_images = config.mixed_precision.n_images if search is not None else 0
    hmse_layers = _hmse_layers(gm, config)
    if hmse_layers:
        keep_images = max(keep_images, HMSE_IMAGES)
    if keep_batches or keep_images:
        stream = _keep_first(stream, retained, keep_batches, keep_images)
    n = calibrate(gm, stream, verbose=verbose, total=total)
    board = TensorBoardLogger(config.log_dir)
    board.calibration(gm)
    input_means = {name: obs.mean() for name, obs in observers.items()}
    remove_observers(gm)
    if config.power_of_two_alignment:
        gm.meta[ALIGNMENT_KEY] = alignment_factors(gm, config)
        for name, factor in apply_alignment(gm, gm.meta[ALIGNMENT_KEY]).items():
            if name in input_means:
                input_means[name] = input_means[name] * factor
    if config.softmax_shift:
        shift_softmax_inputs(gm)
    if search is not None:
        search.keep_histograms()
    device = model_device(gm)
    importance = None
    if hmse_layers:
        with quantizers_off(gm):
            service = HessianService.from_model_inputs(gm, take_images(retained, HMSE_IMAGES))
            importance = service.weights(hmse_layers, Granularity.PER_ELEMENT)
    freeze_quantizers(gm, config, importance)
    kept = [to_device(b, device) for b in retained[:SECOND_MOMENT_BATCHES]] if moment_batches else []
    mixed = None
    if search is None:
        gm.meta[CORRECTION_KEY] = _finish(gm, kept, input_means, config)
    else:
        images = [to_device(b, device) for b in take_images(retained, config.mixed_precision.n_images)]
        mixed, gm.meta[CORRECTION_KEY] = _search(gm, search, images, kept, input_means, config, verbose, importance)
    summary = summarize(gm, mixed)
    gm.meta[SUMMARY_KEY] = summary
    gm.meta[CONFIG_KEY] = config  # mct_fx.compare prepares the float model the same way
    if board.enabled:
        _log_result(board, model, gm, retained[:SIMILARITY_BATCHES], mixed, inplace)
    log.info("quantized with %s on %d calibration batches\n%s", gm.meta["mct_fx.tpc"], n, summary)
    return gm


def _finish(gm: fx.GraphModule, kept: list, input_means: dict[str, Tensor], config: QuantConfig) -> str:
    """Concat grids (when asked) and the weight-error correction; returns the correction kept."""
    if config.concat_threshold_update:
        unify_concat_grids(gm)
    return correct_weight_errors(gm, kept, input_means, config)


def _search(gm: fx.GraphModule, search: MixedPrecisionSearch, images: list, kept: list,
            input_means: dict[str, Tensor], config: QuantConfig, verbose: bool,
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
        correction = _finish(gm, kept, input_means, config)
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
