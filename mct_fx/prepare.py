"""Preparing a model for quantization (trace, graph passes, quantizers), and preparing a float model again.

``prepare`` is the front half of every workflow.  The GraphModule it returns
records how it was made (:class:`Preparation`: the target itself, leaf modules,
concrete args), so analyses can prepare the float model again identically
(:func:`float_reference`), whatever TPC it was: built-in, derived or a JSON file.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import Any

from torch import fx, nn

from mct_fx.config import CONFIG_KEY, QuantConfig
from mct_fx.data import split_batch, to_device
from mct_fx.graph_utils import model_device
from mct_fx.meta import ALIGNMENT, PREPARATION
from mct_fx.passes.align_pot import apply_alignment
from mct_fx.passes.bias_correction import add_missing_biases
from mct_fx.passes.box_precision import box_overrides
from mct_fx.passes.collapse_linear import collapse_linear_layers
from mct_fx.passes.collapse_residual import collapse_residuals
from mct_fx.passes.equalize_channels import equalize_channels
from mct_fx.passes.fold_bn import fold_batchnorm
from mct_fx.passes.functionalize import functionalize_layers
from mct_fx.passes.insert_quantizers import insert_quantizers
from mct_fx.passes.overrides import apply_overrides
from mct_fx.passes.relu_bound import bound_relus_to_power_of_two
from mct_fx.quantizers.modules import FakeQuantizer
from mct_fx.resources import CostModel, ResourceUtilization
from mct_fx.tensorboard import TensorBoardLogger
from mct_fx.tpc.builtin import get_tpc
from mct_fx.tpc.matching import annotate, annotation, describe_target
from mct_fx.tpc.schema import TargetPlatformCapabilities
from mct_fx.trace import trace

__all__ = ["prepare", "Preparation", "float_reference", "resource_utilization", "TPCLike"]

log = logging.getLogger("mct_fx")
TPCLike = str | os.PathLike | TargetPlatformCapabilities


@dataclass(frozen=True)
class Preparation:
    """How a GraphModule was prepared (in ``gm.meta["mct_fx.preparation"]``): enough to prepare it again."""

    tpc: TargetPlatformCapabilities
    leaf_modules: tuple[type | str, ...] = ()
    concrete_args: dict[str, Any] | None = None


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
    apply_overrides(gm, box_overrides(gm) + tuple(config.overrides))  # the user's overrides come last: they win
    if config.relu_bound_to_power_of_2:
        bound_relus_to_power_of_two(gm)
    insert_quantizers(gm)
    if config.weights_bias_correction or config.weights_second_moment_correction or config.softmax_shift:
        add_missing_biases(gm)  # the corrections write biases: a prepared model has the same state_dict keys
    gm.meta[PREPARATION] = Preparation(target, tuple(leaf_modules), dict(concrete_args) if concrete_args else None)
    return gm


def float_reference(float_model: nn.Module, example_batch: Any, qmodel: fx.GraphModule, *,
                    inplace: bool = False) -> fx.GraphModule | None:
    """``float_model`` prepared again the way ``qmodel`` was (same target, config, tracing, alignment), every
    quantizer off: same node names, the float function.  None when ``qmodel`` does not record how."""
    config, preparation = qmodel.meta.get(CONFIG_KEY), qmodel.meta.get(PREPARATION)
    if config is None or preparation is None:
        return None
    ref = prepare(float_model, example_batch, preparation.tpc, replace(config, log_dir=None),
                  leaf_modules=preparation.leaf_modules, concrete_args=preparation.concrete_args, inplace=inplace)
    apply_alignment(ref, qmodel.meta.get(ALIGNMENT, {}))
    for q in ref.modules():
        if isinstance(q, FakeQuantizer):
            q.mode = "off"
    return ref


def resource_utilization(model: nn.Module, example_input: Any = None, tpc: TPCLike = "imx500",
                         config: QuantConfig | None = None, **prepare_kwargs: Any) -> ResourceUtilization:
    """Utilization of ``model`` quantized for ``tpc`` at the target's default bit-widths, per sample.

    A GraphModule that ``mct_fx`` quantized (or prepared) is measured as it is,
    with the bit-widths it was given (``example_input`` and ``tpc`` unused).
    """
    if isinstance(model, fx.GraphModule) and any(annotation(n) is not None for n in model.graph.nodes):
        return CostModel(model).evaluate()
    if example_input is None:
        raise ValueError("resource_utilization: an example_input is needed to measure a model that mct_fx has "
                         "not prepared")
    return CostModel(prepare(model, example_input, tpc, config, **prepare_kwargs)).evaluate()
