"""Calibration: run data through the graph while activation quantizers observe it."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import fx
from tqdm.auto import tqdm

from mct_fx.data import CalibrationError, ModelInputs, to_device
from mct_fx.graph_utils import model_device, quantizer_nodes
from mct_fx.quantizers.modules import ActivationQuantizer
from mct_fx.trace import failing_node

__all__ = ["calibrate"]


def _shapes(inputs: ModelInputs) -> str:
    args, kwargs = inputs
    items = list(args) + list(kwargs.values())
    return ", ".join(str(tuple(v.shape)) if isinstance(v, torch.Tensor) else type(v).__name__ for v in items)


def calibrate(gm: fx.GraphModule, batches: Iterable[ModelInputs], *, verbose: bool = True,
              total: int | None = None) -> int:
    """Feed every batch through ``gm`` with activation quantizers observing; returns the batch count.

    A batch the graph cannot run (e.g. a shape the traced model does not accept)
    raises :class:`CalibrationError` naming the batch and the failing node.
    """
    for _, q in quantizer_nodes(gm, ActivationQuantizer):
        q.set_mode("observe")
    device = model_device(gm)
    count = 0
    progress = tqdm(batches, desc="calibration", unit="batch", total=total, disable=not verbose)
    with torch.no_grad():
        for index, inputs in enumerate(progress):
            args, kwargs = to_device(inputs, device)
            try:
                gm(*args, **kwargs)
            except Exception as e:  # noqa: BLE001 - re-raised with the batch and node named
                node, err = failing_node(gm, args, kwargs)
                err = err or e
                at = f" at node {node.name!r}" if node is not None else ""
                reason = str(err).split("\n\nWhile executing")[0]  # fx appends the node dump
                raise CalibrationError(f"calibration batch {index} (input shapes {_shapes(inputs)}) fails{at}: "
                                       f"{type(err).__name__}: {reason}") from e
            count += 1
    return count
