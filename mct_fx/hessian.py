"""Label-free Hessian approximations (Hutchinson) for activations and weights of a GraphModule.

For a model output ``y`` and a tensor ``a`` inside the model (a node's output,
or a layer's weight), the label-free Hessian is ``JᵀJ`` with ``J = ∂y/∂a``:
what an MSE between the float and a perturbed model's outputs sees, to second
order, when ``a`` is perturbed.  Hutchinson's estimator gives its diagonal
without forming ``J``: with Rademacher vectors ``v`` (±1) on the output,
``E[(Jᵀv)²] = diag(JᵀJ)``; one forward pass serves many ``v`` (one backward
each), and every target node of the request shares each backward pass.

Activation values are per image (``[N, ...]``: ``J`` is taken image by image);
weight values are the mean over images of the per-image ``JᵀJ`` diagonal.
Granularity: per tensor (the trace), per output channel (the sum over the
channel), per element (the diagonal).
"""

from __future__ import annotations

import enum
import math
from collections.abc import Iterable, Sequence

import torch
from torch import Tensor, fx
from torch.utils._pytree import tree_leaves

from mct_fx.config import HessianConfig  # re-exported: it was defined here
from mct_fx.data import ModelInputs, iter_batches, to_device
from mct_fx.graph_utils import TRANSPOSED_CONVS, attr_value, model_device, param_source, placeholder_values
from mct_fx.tpc.matching import measured_view
from mct_fx.tpc.vocabulary import LINEAR_OPS, op_name

__all__ = ["Granularity", "HessianConfig", "HessianService", "normalized_traces"]


class Granularity(str, enum.Enum):
    PER_TENSOR = "per_tensor"
    PER_CHANNEL = "per_channel"
    PER_ELEMENT = "per_element"


class HessianService:
    """Hessian estimates for one GraphModule and one fixed set of input batches, cached per request.

    Runs the module as it is (switch quantizers off for the float model's
    Hessian) on the module's device.  ``inputs``: anything a calibration loader
    may be; it is read once, when the service is made.
    """

    def __init__(self, gm: fx.GraphModule, inputs: Iterable, config: HessianConfig | None = None,
                 n_batches: int | None = None):
        gm = measured_view(gm)  # a detector's NMS outputs a selection: differentiate its boxes and scores
        self.gm = gm
        self.config = config or HessianConfig()
        device = model_device(gm)
        self.batches = [to_device(b, device) for b in iter_batches(inputs, n_batches)]
        self._nodes = {n.name: n for n in gm.graph.nodes}
        self._cache: dict[tuple[str, str, Granularity], Tensor] = {}

    @classmethod
    def from_model_inputs(cls, gm: fx.GraphModule, batches: Sequence[ModelInputs],
                          config: HessianConfig | None = None) -> HessianService:
        """A service on batches already split into ``(args, kwargs)`` (as PTQ keeps them)."""
        return cls(gm, [kwargs or args[0] for args, kwargs in batches], config)

    def activations(self, nodes: Sequence[str | fx.Node],
                    granularity: Granularity | str = Granularity.PER_TENSOR) -> dict[str, Tensor]:
        """Per image ``diag(JᵀJ)`` of each node's output: ``[N]``, ``[N, C]`` (channel axis 1) or ``[N, *shape]``."""
        return self._request("activation", nodes, Granularity(granularity))

    def weights(self, nodes: Sequence[str | fx.Node],
                granularity: Granularity | str = Granularity.PER_TENSOR) -> dict[str, Tensor]:
        """Mean over images of ``diag(JᵀJ)`` of each Conv/Linear node's weight: ``[]``, ``[C_out]`` or its shape."""
        return self._request("weight", nodes, Granularity(granularity))

    def _request(self, kind: str, nodes: Sequence[str | fx.Node], granularity: Granularity) -> dict[str, Tensor]:
        names = [n.name if isinstance(n, fx.Node) else n for n in nodes]
        for name in names:
            self._check_target(kind, name)
        missing = [n for n in dict.fromkeys(names) if (kind, n, granularity) not in self._cache]
        if missing:
            for name, value in self._estimate(kind, missing, granularity).items():
                self._cache[(kind, name, granularity)] = value
        return {n: self._cache[(kind, n, granularity)] for n in names}

    def _check_target(self, kind: str, name: str) -> None:
        node = self._nodes.get(name)
        if node is None:
            raise KeyError(f"Hessian: no node named {name!r} in the graph")
        if kind == "weight" and self._weight_of(node) is None:
            raise ValueError(f"Hessian: node {name!r} is not a Conv/ConvTranspose/Linear layer with a weight "
                             "parameter")
        if kind == "activation" and node.op == "output":
            raise ValueError("Hessian: the output node has no activation of its own; pick the node that feeds it")

    def _weight_of(self, node: fx.Node) -> Tensor | None:
        if node.op != "call_function" or op_name(node, self.gm) not in LINEAR_OPS or len(node.args) < 2:
            return None
        w = attr_value(self.gm, param_source(node.args[1]))
        return w if isinstance(w, torch.nn.Parameter) else None

    def _estimate(self, kind: str, names: list[str], granularity: Granularity) -> dict[str, Tensor]:
        gen = torch.Generator(device="cpu").manual_seed(self.config.seed)
        per_batch: dict[str, list[Tensor]] = {n: [] for n in names}
        images = 0
        for args, kwargs in self.batches:
            values, batch = self._estimate_batch(kind, names, granularity, args, kwargs, gen)
            images += batch
            for name, v in values.items():
                per_batch[name].append(v)
        if kind == "activation":
            return {n: torch.cat(vs) for n, vs in per_batch.items()}
        return {n: torch.stack(vs).sum(0) / images for n, vs in per_batch.items()}

    def _estimate_batch(self, kind, names, granularity, args, kwargs, gen) -> tuple[dict[str, Tensor], int]:
        weights = {n: self._weight_of(self._nodes[n]) for n in names} if kind == "weight" else {}
        flags = {id(w): w.requires_grad for w in weights.values()}
        for w in weights.values():
            w.requires_grad_(True)
        try:
            with torch.enable_grad():
                probes = _Probe(self.gm, set(names) if kind == "activation" else set())
                out = probes.run(*placeholder_values(self.gm, args, kwargs))
                outputs = [t for t in tree_leaves(out) if isinstance(t, Tensor) and t.is_floating_point()
                           and t.requires_grad]
                if not outputs:
                    raise RuntimeError("Hessian: the model output does not depend on the requested tensors")
                targets = [probes.leaves[n] for n in names] if kind == "activation" else [weights[n] for n in names]
                batch = outputs[0].shape[0] if outputs[0].dim() else 1
                return self._iterate(kind, names, granularity, outputs, targets, gen), batch
        finally:
            for w in weights.values():
                w.requires_grad_(flags[id(w)])

    def _iterate(self, kind, names, granularity, outputs, targets, gen) -> dict[str, Tensor]:
        cfg = self.config
        sums = [None] * len(targets)
        previous = None
        for it in range(1, cfg.max_iterations + 1):
            vs = [(torch.randint(0, 2, o.shape, generator=gen, dtype=torch.int8) * 2 - 1).to(o.device, o.dtype)
                  for o in outputs]
            loss = sum((o * v).sum() for o, v in zip(outputs, vs, strict=True))
            grads = torch.autograd.grad(loss, targets, retain_graph=it < cfg.max_iterations, allow_unused=True)
            for i, (g, t) in enumerate(zip(grads, targets, strict=True)):
                sq = torch.zeros_like(t) if g is None else g.detach().float() ** 2
                sums[i] = sq if sums[i] is None else sums[i] + sq
            total = sum(float(s.sum()) for s in sums) / it
            if it >= cfg.min_iterations and previous is not None and \
                    abs(total - previous) <= cfg.tolerance * max(abs(total), 1e-30):
                break
            previous = total
        return {n: _reduce(s / it, kind, granularity, self._weight_axis(n) if kind == "weight" else 1)
                for n, s in zip(names, sums, strict=True)}

    def _weight_axis(self, name: str) -> int:
        return 1 if self._nodes[name].target in TRANSPOSED_CONVS else 0


def _reduce(diag: Tensor, kind: str, granularity: Granularity, axis: int) -> Tensor:
    """Sum ``diag`` to the requested granularity (activations keep their batch dimension)."""
    if granularity is Granularity.PER_ELEMENT:
        return diag
    if kind == "activation":
        if granularity is Granularity.PER_TENSOR or diag.dim() < 2:
            return diag.reshape(diag.shape[0], -1).sum(1)
        return diag.movedim(1, -1).reshape(diag.shape[0], -1, diag.shape[1]).sum(1)
    if granularity is Granularity.PER_TENSOR or diag.dim() == 0:
        return diag.sum()
    return diag.movedim(axis, 0).reshape(diag.shape[axis], -1).sum(1)


class _Probe(fx.Interpreter):
    """Runs the graph, adding a zero leaf to each target node's output so its gradient can be asked for.

    ``out + leaf`` keeps the gradient flowing to nodes upstream of the target,
    so one backward pass serves targets that feed one another.
    """

    def __init__(self, gm: fx.GraphModule, targets: set[str]):
        super().__init__(gm)
        self.targets = targets
        self.leaves: dict[str, Tensor] = {}

    def run_node(self, n: fx.Node) -> object:
        out = super().run_node(n)
        if n.name in self.targets:
            if not (isinstance(out, Tensor) and out.is_floating_point()):
                raise ValueError(f"Hessian: node {n.name!r} does not output a floating-point tensor")
            leaf = torch.zeros_like(out, requires_grad=True)
            self.leaves[n.name] = leaf
            out = out + leaf
        return out


def normalized_traces(values: dict[str, Tensor]) -> dict[str, float]:
    """Per-tensor traces (mean over images) scaled to sum to 1, e.g. as weights of interest points."""
    means = {n: float(v.float().mean()) for n, v in values.items()}
    total = sum(means.values())
    if not math.isfinite(total) or total <= 0:
        return {n: 1.0 / len(means) for n in means} if means else {}
    return {n: m / total for n, m in means.items()}
