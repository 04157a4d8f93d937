"""Expose the per-sample statistics of every BatchNorm input as extra graph outputs.

Data generation matches these against each BatchNorm's running mean and
variance.  After :func:`tap_bn_inputs` the module returns ``(output, stats)``,
``stats`` holding, per BatchNorm in execution order, the mean and the second
moment (mean of squares) of its input over every axis but batch and channel
(``[N, C]`` each): two reductions per layer, differentiable, instead of keeping
whole activations alive for hooks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, fx
from torch.nn.modules.batchnorm import _BatchNorm

from mct_fx.quantizers.modules import FakeQuantizer

__all__ = ["BNTap", "BNTapError", "tap_bn_inputs", "per_sample_moments"]


class BNTapError(ValueError):
    """The model has no usable BatchNorm statistics; the message says which layer and why."""


@dataclass(frozen=True)
class BNTap:
    """One BatchNorm layer: its node name and the running statistics its inputs should match."""

    name: str
    mean: Tensor
    var: Tensor


class _Moments(torch.autograd.Function):
    """Mean and mean of squares over the last axis of ``[N, C, L]``, with a one-op backward
    (autograd's own, through a norm or a square, costs several full-size temporaries)."""

    @staticmethod
    def forward(ctx, flat: Tensor) -> tuple[Tensor, Tensor]:
        ctx.save_for_backward(flat)
        return flat.mean(2), torch.linalg.vector_norm(flat, dim=2).square() / flat.shape[2]

    @staticmethod
    def backward(ctx, grad_mean: Tensor, grad_second: Tensor) -> Tensor:
        (flat,) = ctx.saved_tensors
        n = flat.shape[2]
        return torch.addcmul((grad_mean / n)[..., None], flat, (grad_second * (2 / n))[..., None])


@torch.fx.wrap
def per_sample_moments(x: Tensor) -> tuple[Tensor, Tensor]:
    """``(mean, mean of squares)`` of ``x`` per sample and channel (axis 1), both ``[N, C]``, in float32."""
    x = x.float()
    if x.dim() == 2:  # BatchNorm1d on [N, C]: one value per sample and channel
        return x, x * x
    return _Moments.apply(x.flatten(2))


def _batchnorm(gm: fx.GraphModule, node: fx.Node) -> _BatchNorm | None:
    if node.op != "call_module":
        return None
    module = gm.get_submodule(node.target)
    return module if isinstance(module, _BatchNorm) else None


def _check_model(gm: fx.GraphModule) -> None:
    """Reject graphs whose BatchNorm layers are folded or hidden inside opaque modules."""
    if any(isinstance(m, FakeQuantizer) for m in gm.modules()):
        raise BNTapError("the model holds mct_fx quantizers: its BatchNorm layers are already folded into the "
                         "convolutions; pass the float model, before mct_fx.prepare / quantize")
    for node in gm.graph.nodes:
        if node.op != "call_module" or _batchnorm(gm, node) is not None:
            continue
        hidden = [n for n, m in gm.get_submodule(node.target).named_modules() if isinstance(m, _BatchNorm)]
        if hidden:
            kind = type(gm.get_submodule(node.target)).__name__
            raise BNTapError(
                f"node {node.name!r} ({kind}) fuses its BatchNorm {hidden[0]!r} into the layer, so the BatchNorm "
                f"input cannot be observed; pass the model before fusing (or do not list {node.target!r} in "
                "leaf_modules)")


def tap_bn_inputs(gm: fx.GraphModule) -> list[BNTap]:
    """Make ``gm`` return ``(output, stats)`` (see the module docstring); returns the BatchNorm layers
    in the order of ``stats``."""
    _check_model(gm)
    graph = gm.graph
    taps: list[BNTap] = []
    stats: list[fx.Node] = []
    for node in list(graph.nodes):
        bn = _batchnorm(gm, node)
        if bn is None:
            continue
        if bn.running_mean is None or bn.running_var is None:
            raise BNTapError(f"BatchNorm node {node.name!r} keeps no running statistics "
                             "(track_running_stats=False): there is nothing to match")
        if int(getattr(bn, "num_batches_tracked", 1) or 0) == 0 and bool((bn.running_var == 1).all()) and bool(
                (bn.running_mean == 0).all()):
            raise BNTapError(f"BatchNorm node {node.name!r} has its initial running statistics (mean 0, var 1, "
                             "no batch tracked): the model looks untrained")
        with graph.inserting_before(node):
            stats.append(graph.call_function(per_sample_moments, (node.args[0],)))
        taps.append(BNTap(node.name, bn.running_mean.detach().float(), bn.running_var.detach().float()))
    if not taps:
        raise BNTapError("the model has no BatchNorm layer: data generation matches BatchNorm running statistics. "
                         "If its BatchNorm layers were folded into the convolutions (fuse_modules, "
                         "fuse_conv_bn_eval), pass the unfused model")
    output = next(n for n in graph.nodes if n.op == "output")
    output.args = ((output.args[0], tuple(stats)),)
    graph.lint()
    gm.recompile()
    return taps

