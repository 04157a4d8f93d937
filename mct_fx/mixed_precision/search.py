"""Mixed precision inside PTQ: measure each candidate's sensitivity, solve for bits, apply them.

Used by :func:`mct_fx.quantize` when it is given a ``target``:

1. right after ``prepare``: find the configurable nodes, build the cost model
   and reject a budget no choice can meet (before any calibration work);
2. after calibration, before freezing: keep the activation histograms
   (:meth:`keep_histograms`);
3. after freezing at the target's base configuration: freeze every candidate's
   quantizers, measure sensitivities (each candidate corrected for its weight
   error as PTQ will correct it, :mod:`.corrections`), solve, and put the chosen
   quantizers into the graph.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

from torch import Tensor, fx
from tqdm.auto import tqdm

from mct_fx.config import DistanceWeighting, QuantConfig
from mct_fx.data import ModelInputs
from mct_fx.hessian import HessianService, normalized_traces
from mct_fx.mixed_precision.candidates import AlternativeQuantizers, Configurable, configurable_nodes, swap, unswap
from mct_fx.mixed_precision.corrections import CandidateCorrection, candidate_correction
from mct_fx.mixed_precision.sensitivity import SensitivityEvaluator, interest_points
from mct_fx.mixed_precision.solver import check_feasible, solve
from mct_fx.quantizers.modules import quantizers_off
from mct_fx.resources import CostModel, ResourceUtilization, activation_bits, weight_bits
from mct_fx.tpc.matching import annotation

__all__ = ["MixedPrecisionSearch", "MixedPrecisionResult"]


@dataclass(frozen=True)
class MixedPrecisionResult:
    """What the search chose: per configurable node its candidate (``"W4"``, ``"A16"``, ``"W8A16"``)."""

    target: ResourceUtilization
    utilization: ResourceUtilization
    bits: dict[str, str]
    sensitivity: dict[str, dict[str, float]]  # node -> candidate -> distance from the float model
    seconds: float

    def __str__(self) -> str:
        counts: dict[str, int] = {}
        for b in self.bits.values():
            counts[b] = counts.get(b, 0) + 1
        chosen = ", ".join(f"{b} x {n}" for b, n in sorted(counts.items()))
        return (f"mixed precision ({self.seconds:.1f} s): target {self.target}; achieved {self.utilization}; "
                f"{len(self.bits)} configurable nodes: {chosen or 'none'}")


class MixedPrecisionSearch:
    """One search over a prepared GraphModule; see the module docstring for the order of calls."""

    def __init__(self, gm: fx.GraphModule, target: ResourceUtilization, config: QuantConfig):
        if not isinstance(target, ResourceUtilization):
            raise TypeError(f"target: expected a mct_fx.ResourceUtilization, got {type(target).__name__}")
        if not target.items():
            raise ValueError("target: set at least one of weights_memory, activation_memory, total_memory, bops")
        self.gm, self.target, self.config = gm, target, config
        self.entries = configurable_nodes(gm)
        self.costs = CostModel(gm)
        check_feasible(self.costs, self.entries, target)
        self._alternatives: AlternativeQuantizers | None = None
        self._built = False
        self._chosen: list[tuple[Configurable, dict, object]] = []  # what run() replaced, for undo()

    def keep_histograms(self) -> None:
        self._alternatives = AlternativeQuantizers(self.gm, self.entries)

    def run(self, images: Sequence[ModelInputs], input_means: dict[str, Tensor], correction: str,
            verbose: bool = True, importance: dict[str, Tensor] | None = None) -> MixedPrecisionResult:
        """Measure, solve and put the chosen quantizers into the graph; each candidate is measured with
        ``correction`` (``"bias"`` or ``"second-moment"``, see :mod:`.corrections`) applied to its layer."""
        if self._alternatives is None:
            raise RuntimeError("keep_histograms() must run before the quantizers are frozen")
        if self._chosen:
            raise RuntimeError("undo() the previous choice before searching again")
        start = time.perf_counter()
        if not self._built:
            self._alternatives.build(self.config, importance)
            self._built = True
        sensitivity = self._sensitivities(images, input_means, correction, verbose) if self.entries else []
        choice = solve(self.costs, self.entries, sensitivity, self.target, self.config.mixed_precision.refine)
        nodes = {n.name: n for n in self.gm.graph.nodes}
        for entry, index in zip(self.entries, choice, strict=True):
            note = annotation(nodes[entry.node])
            self._chosen.append((entry, swap(self.gm, entry, index), note.config))
            note.config = entry.candidates[index]
        utilization = self.costs.evaluate()
        over = utilization.exceeds(self.target)
        if over:  # pragma: no cover - the integer program's constraints are the same sums
            raise RuntimeError(f"mixed precision exceeded the target on {over}: {utilization} vs {self.target}")
        return MixedPrecisionResult(
            self.target, utilization,
            {e.node: e.describe(i) for e, i in zip(self.entries, choice, strict=True)},
            {e.node: {e.describe(i): s for i, s in enumerate(row)} for e, row in zip(self.entries, sensitivity,
                                                                                     strict=True)},
            time.perf_counter() - start)

    def undo(self) -> None:
        """Put the base quantizers and configurations back (the graph as before :meth:`run` chose)."""
        nodes = {n.name: n for n in self.gm.graph.nodes}
        for entry, replaced, config in reversed(self._chosen):
            unswap(self.gm, replaced)
            annotation(nodes[entry.node]).config = config
        self._chosen.clear()

    def _sensitivities(self, images: Sequence[ModelInputs], input_means: dict[str, Tensor], correction: str,
                       verbose: bool) -> list[list[float]]:
        mp = self.config.mixed_precision
        weights = None
        if mp.distance_weighting is DistanceWeighting.HESSIAN:
            with quantizers_off(self.gm):
                service = HessianService.from_model_inputs(self.gm, images, mp.hessian)
                weights = normalized_traces(service.activations([p.name for p in interest_points(self.gm)]))
        evaluator = SensitivityEvaluator(self.gm, images, mp.distance_weighting, mp.output_distance, weights)
        fix = candidate_correction(correction, self.gm, self.entries, images, input_means, self.config)
        try:
            changes = [_Swap(evaluator.probe, fix, e, i)
                       for e in self.entries for i in range(1, len(e.candidates))]
            with tqdm(total=len(changes) * len(evaluator.images), desc="mixed precision", disable=not verbose,
                      leave=False) as bar:
                distances = evaluator.measure(changes, bar.update)
        finally:
            fix.restore()
        base, rows, k = distances[0], [], 1
        for entry in self.entries:
            row = [base]
            for index in range(1, len(entry.candidates)):
                distance = distances[k]
                k += 1
                if _fewer_bits(entry, index):  # never cheaper *and* better than the base: ties go to bits
                    distance = max(distance, base * (1 + 1e-6) + 1e-12)
                row.append(distance)
            rows.append(row)
        return rows


class _Swap:
    """Candidate ``index`` of ``entry`` as a change the evaluator can apply and revert."""

    def __init__(self, probe: fx.GraphModule, correction: CandidateCorrection, entry: Configurable, index: int):
        self.probe, self.correction, self.entry, self.index = probe, correction, entry, index
        self.starts = tuple(entry.targets[role] for role in entry.quantizers.get(index, {}))
        self._replaced: dict = {}

    def apply(self) -> None:
        self._replaced = swap(self.probe, self.entry, self.index)
        self.correction.use_candidate(self.entry, self.index)

    def revert(self) -> None:
        unswap(self.probe, self._replaced)
        self.correction.use_base(self.entry)


def _fewer_bits(entry: Configurable, index: int) -> bool:
    base, cand = entry.candidates[0], entry.candidates[index]
    return weight_bits(cand) <= weight_bits(base) and activation_bits(cand) <= activation_bits(base)
