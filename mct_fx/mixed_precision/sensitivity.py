"""Sensitivity of a quantized GraphModule to each node's candidate bit-widths.

The distance of a model from the float one is measured at interest points (the
quantized outputs of the Conv/Linear layers and their fused groups, normalized
MSE) and at the model's outputs (KL divergence after a softmax, cosine distance
after an L2 normalization, normalized MSE otherwise).  Interest points are
aggregated per :class:`DistanceWeighting` and added to the mean output distance.

The evaluator runs one copy of the graph that also returns the interest
points, sharing the quantizer modules: a candidate is measured by swapping its
frozen quantizers in and re-running, on the sample images, only the part of the
graph downstream of them (no re-quantization, about half a forward pass each).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Protocol

import torch
from torch import Tensor, fx
from torch.utils._pytree import tree_leaves

from mct_fx.config import DistanceWeighting, OutputDistance
from mct_fx.data import ModelInputs
from mct_fx.graph_utils import placeholder_values
from mct_fx.meta import Role, quantizer_nodes_by_role
from mct_fx.quantizers.modules import quantizers_off
from mct_fx.resources import example_batch_size, per_sample_numel, tensor_metas
from mct_fx.tpc.matching import annotation, measured_outputs
from mct_fx.tpc.vocabulary import LINEAR_OPS

__all__ = ["SensitivityEvaluator", "interest_points"]

_EPS = 1e-12


EXP_SIGMA = 0.1
NORM_FLOOR = 1e-2  # smallest per-sample normalizer of a distance, relative to the value's mean over the images


def interest_points(gm: fx.GraphModule) -> list[fx.Node]:
    """Activation-quantizer nodes at the outputs of Conv/Linear layers (or of fused groups holding one).

    A layer that is also a model output stays an interest point (its output counts twice): leaving it
    out measured better on the Fashion-MNIST ResNet (+3 test images) but cost the ImageNet
    MobileNetV2 5.5 points of agreement at the 3-bit size; adding adds/concats/sigmoids as MCT
    does cost the ResNet 14 images.
    """
    with_layer = {annotation(n).fused_into or n.name for n in gm.graph.nodes
                  if annotation(n) is not None and annotation(n).op in LINEAR_OPS}
    return [q for q, record in quantizer_nodes_by_role(gm, Role.ACTIVATION) if record.node in with_layer]


def _storage_op(node: object) -> str | None:
    """Operator set of the node that computed an output value (looking through quantizers and views)."""
    while isinstance(node, fx.Node):
        ann = annotation(node)
        if ann is None and node.op == "call_module" and node.args:
            node = node.args[0]
        elif ann is not None and ann.op in ("Reshape", "Flatten", "Squeeze", "Identity", "Dropout", "Cast"):
            node = node.args[0]
        else:
            return ann.op if ann is not None else None
    return None


def _rows(t: Tensor) -> Tensor:
    return t.float().reshape(1, -1) if t.dim() == 0 else t.float().flatten(1)


def _nmse(q: Tensor, f: Tensor, f_norm: Tensor) -> Tensor:
    return torch.linalg.vector_norm(q - f, dim=1).square() / (f_norm + _EPS)


def _cosine(q: Tensor, f: Tensor, f_norm: Tensor) -> Tensor:
    return 1 - torch.nn.functional.cosine_similarity(q, f, dim=1, eps=1e-8)


def _kl(q: Tensor, f: Tensor, f_norm: Tensor) -> Tensor:
    p, r = f.clamp_min(1e-8), q.clamp_min(1e-8)
    return (p * (p / r).log()).sum(1)


_DISTANCES = {OutputDistance.MSE: _nmse, OutputDistance.KL: _kl, OutputDistance.COSINE: _cosine}


class Change(Protocol):
    """A candidate to measure: the quantizer modules it swaps (``starts``: their graph targets)."""

    starts: tuple[str, ...]

    def apply(self) -> None: ...

    def revert(self) -> None: ...


class SensitivityEvaluator:
    """Distances from the float model of the quantized ``gm`` and of one-node changes of it, on fixed images.

    ``measure`` runs the base model once per chunk of images (as many as keep
    every node value within 768 MiB), keeping every node's value, and for each
    change re-runs only the nodes downstream of the quantizers it swaps (about
    half the graph on average), re-measuring only
    the interest points it can reach.
    """

    def __init__(self, gm: fx.GraphModule, images: Sequence[ModelInputs],
                 weighting: DistanceWeighting = DistanceWeighting.AVG,
                 output_distance: OutputDistance = OutputDistance.AUTO,
                 hessian_weights: dict[str, float] | None = None, chunk: int | None = None):
        self.weighting = DistanceWeighting(weighting)
        self.points = interest_points(gm)
        graph = fx.Graph()
        values: dict[fx.Node, fx.Node] = {}
        out = graph.graph_copy(gm.graph, values)
        measured = measured_outputs(gm)  # a detector's NMS: its boxes and scores, not its selection
        outputs = tree_leaves(out) if measured is None else [values.get(m, m) for m in measured]
        graph.output((*outputs, *[values[p] for p in self.points]))
        self.probe = fx.GraphModule(gm, graph)  # shares gm's submodules: swapping them on the probe is local
        self.returned = tree_leaves(next(n for n in self.probe.graph.nodes if n.op == "output").args[0])
        kind = OutputDistance(output_distance)
        original_outputs = measured or tree_leaves(next(n for n in gm.graph.nodes if n.op == "output").args[0])
        self.fns = [_DISTANCES[kind if kind is not OutputDistance.AUTO else _auto_kind(o)]
                    for o in original_outputs] + [_nmse] * len(self.points)
        self.n_outputs = len(original_outputs)
        if self.weighting is DistanceWeighting.HESSIAN:
            if hessian_weights is None:
                raise ValueError("Hessian distance weighting needs the interest points' Hessian traces")
            self.point_weights = torch.tensor([hessian_weights[p.name] for p in self.points])
        chunk = chunk or _chunk_size(self.probe)
        self.images = [c for args, kwargs in images for c in _chunks(placeholder_values(self.probe, args, kwargs),
                                                                     bool(kwargs), chunk)]
        self.n_images = sum(_lead(c) for c in self.images)
        self._by_target = {n.target: n for n in self.probe.graph.nodes if n.op == "call_module"}
        self._order = {n: i for i, n in enumerate(self.probe.graph.nodes)}
        self._dirty: dict[tuple[str, ...], list[fx.Node]] = {}
        with torch.no_grad(), quantizers_off(self.probe):
            refs = [[_rows(v) if isinstance(v, Tensor) and v.is_floating_point() else None
                     for v in self._returned(self._run_all(values))] for values in self.images]
        self.reference = _with_norms(refs)

    def measure(self, changes: Sequence[Change] = (), progress: Callable[[], object] | None = None) -> list[float]:
        """The aggregated distance of the model as it is (first), then with each change applied alone.

        ``progress`` is called once per change and image chunk.
        """
        n = len(self.returned)
        sums = torch.zeros(len(changes) + 1, n, dtype=torch.float64)
        with torch.no_grad():
            for chunk, values in enumerate(self.images):
                env = self._run_all(values)
                base = self._distances(env, chunk, range(n))
                sums[0] += base
                for k, change in enumerate(changes, start=1):
                    dirty = self._dirty_nodes(change.starts)
                    change.apply()
                    try:
                        local = self._rerun(env, dirty)
                    finally:
                        change.revert()
                    changed = [i for i, r in enumerate(self.returned) if r in dirty]
                    row = base.clone()
                    row[changed] = self._distances(local, chunk, changed)
                    sums[k] += row
                    if progress is not None:
                        progress()
        return [self._aggregate(row / self.n_images) for row in sums]

    def _aggregate(self, mean: Tensor) -> float:
        outputs = [float(v) for v, r in zip(mean[:self.n_outputs], self.reference[0][:self.n_outputs],
                                            strict=True) if r[0] is not None]
        output_term = sum(outputs) / len(outputs) if outputs else 0.0
        if not self.points or self.weighting is DistanceWeighting.LAST_LAYER:
            return output_term
        per_point = mean[self.n_outputs:].float()
        if self.weighting is DistanceWeighting.AVG:
            weights = torch.ones_like(per_point)
        elif self.weighting is DistanceWeighting.EXP:
            weights = 1 - torch.exp(-per_point / EXP_SIGMA)
        else:
            weights = self.point_weights.to(per_point)
        total = float(weights.sum())
        point_term = float((weights * per_point).sum() / total) if total > 0 and math.isfinite(total) else 0.0
        return point_term + output_term

    def _distances(self, env: dict, chunk: int, which: Sequence[int]) -> Tensor:
        """Sum over the chunk's images of the distance at each returned value in ``which``."""
        out = torch.zeros(len(which), dtype=torch.float64)
        for j, i in enumerate(which):
            ref, norm = self.reference[chunk][i]
            if ref is not None:
                value = env[self.returned[i]] if isinstance(self.returned[i], fx.Node) else self.returned[i]
                out[j] = float(self.fns[i](_rows(value), ref, norm).sum())
        return out

    def _returned(self, env: dict) -> list:
        return [env[r] if isinstance(r, fx.Node) else r for r in self.returned]

    def _run_all(self, values: list) -> dict:
        interp = fx.Interpreter(self.probe, garbage_collect_values=False)
        interp.run(*values)
        return interp.env

    def _rerun(self, env: dict, dirty: list[fx.Node]) -> dict:
        interp = fx.Interpreter(self.probe, garbage_collect_values=False)
        interp.env = dict(env)
        for node in dirty:
            interp.env[node] = interp.run_node(node)
        return interp.env

    def _dirty_nodes(self, starts: tuple[str, ...]) -> list[fx.Node]:
        """The swapped quantizers' nodes and everything downstream of them, in execution order."""
        if starts not in self._dirty:
            seen: set[fx.Node] = set()
            stack = [self._by_target[t] for t in starts if t in self._by_target]
            while stack:
                node = stack.pop()
                if node in seen or node.op == "output":
                    continue
                seen.add(node)
                stack.extend(node.users)
            self._dirty[starts] = sorted(seen, key=self._order.__getitem__)
        return self._dirty[starts]


def _with_norms(refs: list[list[Tensor | None]]) -> list[list[tuple[Tensor | None, Tensor | None]]]:
    """Each chunk's float values with their per-sample squared norms, the normalizers of the distances.

    A norm is floored at ``NORM_FLOOR`` times the value's mean norm over all the images: a sample
    whose float value is (nearly) zero there, e.g. a squeeze-excitation ReLU that is off for that
    image, would otherwise divide the quantized model's tiny error by almost nothing and drown every
    other distance.
    """
    norms = [[r.square().sum(1) if r is not None else None for r in chunk] for chunk in refs]
    floors = []
    for i in range(len(refs[0]) if refs else 0):
        present = [chunk[i] for chunk in norms if chunk[i] is not None]
        floors.append(NORM_FLOOR * float(torch.cat(present).mean()) if present else 0.0)
    return [[(r, n.clamp_min(f) if n is not None else None) for r, n, f in zip(rc, nc, floors, strict=True)]
            for rc, nc in zip(refs, norms, strict=True)]


def _chunk_size(gm: fx.GraphModule, budget_bytes: float = 3 * 2**28) -> int:
    """Images per chunk so that every node value of a chunk (kept while candidates re-run) fits in ``budget_bytes``."""
    batch = example_batch_size(gm)
    per_image = sum(per_sample_numel(tm, batch) for n in gm.graph.nodes
                    for tm in tensor_metas(n.meta.get("tensor_meta")))
    return int(min(64, max(1, budget_bytes // max(4 * per_image, 1))))


def _lead(values: list) -> int:
    return next((int(a.shape[0]) for a in values if isinstance(a, Tensor) and a.dim() > 0), 1)


def _chunks(values: list, named: bool, size: int) -> list[list]:
    """Positional inputs for the probe, in chunks of at most ``size`` samples (named inputs: one chunk)."""
    lead = next((a.shape[0] for a in values if isinstance(a, Tensor) and a.dim() > 0), None)
    if named or lead is None or lead <= size:
        return [values]
    return [[a[i:i + size] if isinstance(a, Tensor) and a.dim() > 0 and a.shape[0] == lead else a for a in values]
            for i in range(0, lead, size)]


def _auto_kind(value: object) -> OutputDistance:
    op = _storage_op(value)
    if op in ("Softmax",):
        return OutputDistance.KL
    if op == "L2Norm":
        return OutputDistance.COSINE
    return OutputDistance.MSE
