"""Calibration data: turn whatever the user iterates into validated model inputs.

A loader may yield a tensor, a tuple/list whose first item is the input (a
``DataLoader`` of ``(image, label)`` works as is), or a dict of named inputs.
A tensor given as the loader itself (``mct_fx.generate_data``'s images) is a set
of samples, read in batches of ``TENSOR_BATCH``.
Each batch is checked as it arrives (empty, NaN/Inf), and errors name the batch
index.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import Tensor

__all__ = ["CalibrationError", "ModelInputs", "split_batch", "iter_batches", "to_device", "batch_size", "take_images",
           "rebatch", "loader_length", "TENSOR_BATCH"]

ModelInputs = tuple[tuple, dict]
TENSOR_BATCH = 32


class CalibrationError(ValueError):
    """Bad calibration data; the message names the batch at fault."""


def split_batch(batch: Any, index: int) -> ModelInputs:
    """``(args, kwargs)`` for the model from one loader item."""
    if isinstance(batch, Tensor):
        return (batch,), {}
    if isinstance(batch, (tuple, list)):
        if not batch:
            raise CalibrationError(f"calibration batch {index} is an empty {type(batch).__name__}")
        return (batch[0],), {}
    if isinstance(batch, Mapping):
        return (), dict(batch)
    raise CalibrationError(
        f"calibration batch {index} is a {type(batch).__name__}; expected a tensor, "
        "a tuple/list whose first item is the input, or a dict of inputs")


def _check(inputs: ModelInputs, index: int) -> None:
    args, kwargs = inputs
    named = [(f"input {i}", a) for i, a in enumerate(args)] + [(f"input {k!r}", v) for k, v in kwargs.items()]
    for name, value in named:
        if not isinstance(value, Tensor):
            continue
        if value.numel() == 0:
            raise CalibrationError(f"calibration batch {index}: {name} is empty (shape {tuple(value.shape)})")
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise CalibrationError(f"calibration batch {index}: {name} contains NaN or Inf values")


def iter_batches(loader: Iterable, n_batches: int | None = None) -> Iterator[ModelInputs]:
    """Validated ``(args, kwargs)`` per batch; at most ``n_batches``; raises if there are none."""
    if n_batches is not None and n_batches < 1:
        raise CalibrationError(f"n_batches must be >= 1, got {n_batches}")
    if isinstance(loader, Tensor):
        if loader.dim() == 0:
            raise CalibrationError("calibration data is a 0-d tensor; expected [N, ...] samples")
        loader = loader.split(TENSOR_BATCH)
    try:
        iterator = iter(loader)
    except TypeError:
        raise CalibrationError(f"calibration data must be iterable, got {type(loader).__name__}") from None
    count = 0
    for index, batch in enumerate(iterator):
        if n_batches is not None and index >= n_batches:
            break
        inputs = split_batch(batch, index)
        _check(inputs, index)
        count += 1
        yield inputs
    if count == 0:
        raise CalibrationError("the calibration loader yielded no batches")


def loader_length(loader: Iterable) -> int | None:
    """Batches ``iter_batches`` will read from ``loader``, when it knows its length."""
    if isinstance(loader, Tensor):
        return math.ceil(len(loader) / TENSOR_BATCH) if loader.dim() else None
    return len(loader) if hasattr(loader, "__len__") else None


def to_device(inputs: ModelInputs, device: torch.device) -> ModelInputs:
    """Move every tensor input to ``device``."""
    args, kwargs = inputs

    def move(v: Any) -> Any:
        return v.to(device, non_blocking=True) if isinstance(v, Tensor) else v

    return tuple(move(a) for a in args), {k: move(v) for k, v in kwargs.items()}


def _first_tensor(inputs: ModelInputs) -> Tensor | None:
    args, kwargs = inputs
    return next((v for v in (*args, *kwargs.values()) if isinstance(v, Tensor) and v.dim() > 0), None)


def batch_size(inputs: ModelInputs) -> int:
    """Samples in one batch: the leading size of its first tensor input (1 when there is none)."""
    t = _first_tensor(inputs)
    return int(t.shape[0]) if t is not None else 1


def take_images(batches: list[ModelInputs], n: int) -> list[ModelInputs]:
    """The first ``n`` samples of ``batches`` (the last batch cut: tensors with the batch's leading size)."""
    out, count = [], 0
    for inputs in batches:
        if count >= n:
            break
        size, keep = batch_size(inputs), n - count
        if size > keep:
            args, kwargs = inputs

            def cut(v, size=size, keep=keep):
                return v[:keep] if isinstance(v, Tensor) and v.dim() > 0 and v.shape[0] == size else v

            inputs = tuple(cut(a) for a in args), {k: cut(v) for k, v in kwargs.items()}
        out.append(inputs)
        count += min(size, keep)
    return out


def rebatch(batches: list[ModelInputs], size: int) -> list[ModelInputs]:
    """The same samples in batches of ``size`` (tensors with the batch's leading size are split / joined;
    other inputs must be the same in every batch)."""
    if size < 1:
        raise ValueError(f"batch size must be >= 1, got {size}")
    if all(batch_size(b) == size for b in batches[:-1]) and batch_size(batches[-1]) <= size:
        return list(batches)
    args0, kwargs0 = batches[0]
    keys = [("arg", i) for i in range(len(args0))] + [("kw", k) for k in kwargs0]

    def get(inputs: ModelInputs, key: tuple) -> Any:
        return inputs[0][key[1]] if key[0] == "arg" else inputs[1][key[1]]

    def batched(v: Any, n: int) -> bool:
        return isinstance(v, Tensor) and v.dim() > 0 and v.shape[0] == n

    columns = {}
    for key in keys:
        values = [(get(b, key), batch_size(b)) for b in batches]
        if all(batched(v, n) for v, n in values):
            columns[key] = torch.cat([v for v, _ in values]).split(size)
        elif all(v is values[0][0] for v, _ in values):
            columns[key] = None
        else:
            raise ValueError(f"cannot re-batch input {key[1]!r}: it is neither batched nor the same in every batch")
    total = sum(batch_size(b) for b in batches)
    out = []
    for j in range(math.ceil(total / size)):
        pick = {key: (col[j] if col is not None else get(batches[0], key)) for key, col in columns.items()}
        out.append((tuple(pick[("arg", i)] for i in range(len(args0))), {k: pick[("kw", k)] for k in kwargs0}))
    return out
