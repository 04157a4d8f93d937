"""Expose the per-sample statistics of every BatchNorm input as extra graph outputs.

Data generation matches these against each BatchNorm's running mean and
variance.  After :func:`tap_bn_inputs` the module returns ``(output, stats)``,
``stats`` holding, per BatchNorm in execution order, the mean and the second
moment (mean of squares) of its input over every axis but batch and channel
(``[N, C]`` each).  Each (eval-mode) BatchNorm becomes its affine form
``x * scale + shift`` fused with those two reductions in one autograd op whose
backward is two full-size passes (BatchNorm's own backward plus a separate
statistics branch and the sum of both gradients would be three), instead of
keeping whole activations alive for hooks.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
from torch import Tensor, fx
from torch.nn.modules.batchnorm import _BatchNorm

from mct_fx.quantizers.modules import FakeQuantizer

__all__ = ["BNTap", "BNTapError", "tap_bn_inputs", "batchnorm_with_moments"]


class BNTapError(ValueError):
    """The model has no usable BatchNorm statistics; the message says which layer and why."""


@dataclass(frozen=True)
class BNTap:
    """One BatchNorm layer: its node name and the running statistics its inputs should match."""

    name: str
    mean: Tensor
    var: Tensor


class _AffineMoments(torch.autograd.Function):
    """``(x * scale + shift, mean, mean of squares)``, the statistics per sample and channel over the
    remaining axes, in float32 at least; ``scale`` / ``shift`` (``[C]``) get no gradient."""

    @staticmethod
    def forward(ctx, x: Tensor, scale: Tensor, shift: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        view = (1, -1) + (1,) * (x.dim() - 2)
        y = torch.addcmul(shift.view(view).to(x.dtype), x, scale.view(view).to(x.dtype))
        wide = x.to(torch.promote_types(x.dtype, torch.float32))
        ctx.save_for_backward(x, scale)
        if x.dim() == 2:
            return y, wide, wide * wide
        dims = tuple(range(2, x.dim()))  # reduced over strides: a channels-last x is not copied
        return y, wide.mean(dims), torch.linalg.vector_norm(wide, dim=dims).square() / x[0, 0].numel()

    @staticmethod
    def backward(ctx, grad_y: Tensor, grad_mean: Tensor, grad_second: Tensor):
        x, scale = ctx.saved_tensors
        tail = (1,) * (x.dim() - 2)
        n = x[0, 0].numel()
        wide = torch.promote_types(x.dtype, torch.float32)
        grad = torch.addcmul((grad_mean / n).view(*grad_mean.shape, *tail), grad_y.to(wide),
                             scale.to(wide).view(1, -1, *tail))
        grad.addcmul_(x.to(wide), (grad_second * (2 / n)).view(*grad_second.shape, *tail))
        return grad.to(x.dtype), None, None


@torch.fx.wrap
def batchnorm_with_moments(x: Tensor, scale: Tensor, shift: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """An eval-mode BatchNorm as ``x * scale + shift`` (channel axis 1), with the per-sample mean and mean of
    squares of ``x`` (``[N, C]`` each, float32)."""
    return _AffineMoments.apply(x, scale, shift)


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
    stats: list[tuple[fx.Node, fx.Node]] = []
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
        scale = (bn.weight.detach() if bn.affine else 1) / (bn.running_var.detach() + bn.eps).sqrt()
        shift = (bn.bias.detach() if bn.affine else 0) - bn.running_mean.detach() * scale
        prefix = node.name.replace(".", "_")
        gm.register_buffer(f"{prefix}_scale", scale.float().clone())
        gm.register_buffer(f"{prefix}_shift", shift.float().clone())
        with graph.inserting_before(node):
            fused = graph.call_function(batchnorm_with_moments, (
                node.args[0], graph.get_attr(f"{prefix}_scale"), graph.get_attr(f"{prefix}_shift")))
            y = graph.call_function(operator.getitem, (fused, 0))
            stats.append((graph.call_function(operator.getitem, (fused, 1)),
                          graph.call_function(operator.getitem, (fused, 2))))
        taps.append(BNTap(node.name, bn.running_mean.detach().float(), bn.running_var.detach().float()))
        node.replace_all_uses_with(y)
        graph.erase_node(node)
    if not taps:
        raise BNTapError("the model has no BatchNorm layer: data generation matches BatchNorm running statistics. "
                         "If its BatchNorm layers were folded into the convolutions (fuse_modules, "
                         "fuse_conv_bn_eval), pass the unfused model")
    output = next(n for n in graph.nodes if n.op == "output")
    output.args = ((output.args[0], tuple(stats)),)
    graph.lint()
    gm.delete_all_unused_submodules()
    gm.recompile()
    return taps

