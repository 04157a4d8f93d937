"""Pick one candidate per configurable node: least total sensitivity under a resource budget.

An integer program: a boolean per (node, candidate), exactly one per node;
weights memory, activation memory (one constraint per execution step: the
tensors alive there), total memory and BOPS are linear in those booleans (a
layer whose weight bits and input activation bits are both chosen gets a
product variable per candidate pair, linearized).  The rows are built here and
solved by HiGHS through SciPy's ``milp`` (a modelling layer such as cvxpy cost
more to import than the whole search on a small model), then refined greedily:
a node moves to a candidate with more bits while its sensitivity does not grow
and the budget holds.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from mct_fx.mixed_precision.candidates import Configurable
from mct_fx.resources import CostModel, ResourceUtilization, activation_bits, weight_bits
from mct_fx.tpc.schema import OpQuantConfig

__all__ = ["MixedPrecisionError", "solve", "smallest_achievable"]


class MixedPrecisionError(ValueError):
    """The budget cannot be met (the message gives the smallest achievable value)."""


def _bits(entry: Configurable, kind: str) -> np.ndarray:
    if kind == "activation":
        return np.array([activation_bits(c) for c in entry.candidates], dtype=float)
    return np.array([weight_bits(c, kind) for c in entry.candidates], dtype=float)


def _cheapest(entries: Sequence[Configurable], field: str) -> dict[str, OpQuantConfig]:
    def cost(c: OpQuantConfig) -> tuple:
        w, a = weight_bits(c), activation_bits(c)
        return {"weights_memory": (w, a), "activation_memory": (a, w), "bops": (w * a, w + a)}.get(field, (w + a, w))

    return {e.node: min(e.candidates, key=cost) for e in entries}


def smallest_achievable(costs: CostModel, entries: Sequence[Configurable], field: str) -> float:
    """The least ``field`` any choice of candidates gives (every resource grows with bits)."""
    return getattr(costs.evaluate(_cheapest(entries, field)), field)


def check_feasible(costs: CostModel, entries: Sequence[Configurable], target: ResourceUtilization) -> None:
    """Raise :class:`MixedPrecisionError` naming the first budget below what the candidates can reach."""
    for field, bound in target.items():
        least = smallest_achievable(costs, entries, field)
        if least > bound * (1 + 1e-9):
            unit = "bit operations" if field == "bops" else "bytes"
            raise MixedPrecisionError(
                f"target {field}={bound:.6g} {unit} cannot be met: the smallest achievable with this target's "
                f"candidates is {least:.6g} {unit} (every configurable node at its fewest bits)")


def solve(costs: CostModel, entries: Sequence[Configurable], sensitivity: Sequence[Sequence[float]],
          target: ResourceUtilization, refine: bool = True) -> list[int]:
    """The chosen candidate index per entry (an optimum of the integer program, then refined)."""
    check_feasible(costs, entries, target)
    if not entries:
        return []
    choice = _integer_program(costs, entries, sensitivity, target)
    if refine:
        choice = _refine(costs, entries, sensitivity, target, choice)
    return choice


def _integer_program(costs, entries, sensitivity, target) -> list[int]:
    from scipy.optimize import Bounds, LinearConstraint, milp

    fields = dict(target.items())
    program = _Program(costs, entries)
    weights = program.linear((t.numel / 8, t.node, t.attribute) for t in costs.weights)
    if "weights_memory" in fields:
        program.at_most(weights, fields["weights_memory"])
    if "activation_memory" in fields or "total_memory" in fields:
        for step in costs.steps:
            live = program.linear((t.numel / 8, t.node, "activation") for t in costs.live_at(step))
            if "activation_memory" in fields:
                program.at_most(live, fields["activation_memory"])
            if "total_memory" in fields:
                program.at_most(_plus(weights, live), fields["total_memory"])
    if "bops" in fields:
        program.at_most(program.bops(), fields["bops"])
    # scale the objective so that solver tolerances do not see tiny sensitivities as ties
    s = np.concatenate([np.asarray(v, dtype=float) for v in sensitivity])
    c = np.zeros(program.n)
    c[:len(s)] = s / max(float(np.abs(s).max()), 1e-30)
    integrality = np.zeros(program.n)
    integrality[:len(s)] = 1
    result = milp(c, integrality=integrality, bounds=Bounds(0, 1),
                  constraints=LinearConstraint(program.matrix(), program.lower, program.upper))
    if result.x is None:
        raise MixedPrecisionError(f"no choice of candidates meets the target {target} together "
                                  f"(solver: {result.message})")
    return [int(np.argmax(result.x[where])) for where in program.slices]


_Linear = tuple[dict[int, float], float]  # coefficients by variable, constant


def _accumulate(coef: dict[int, float], items) -> dict[int, float]:
    """Add ``(variable, coefficient)`` pairs into ``coef``."""
    for k, v in items:
        coef[k] = coef.get(k, 0.0) + v
    return coef


def _add(coef: dict[int, float], where: slice, values: np.ndarray) -> None:
    _accumulate(coef, enumerate(values.tolist(), start=where.start))


def _plus(a: _Linear, b: _Linear) -> _Linear:
    return _accumulate(dict(a[0]), b[0].items()), a[1] + b[1]


class _Program:
    """Sparse rows of a mixed-integer program: one boolean per (entry, candidate), exactly one per entry.

    Resources are linear in the booleans; a layer whose kernel bits and input
    activation bits are both chosen gets a continuous variable per candidate pair
    (``z >= w + a - 1``, the product of two booleans where it is pressed down).
    """

    def __init__(self, costs: CostModel, entries: Sequence[Configurable]):
        self.costs, self.entries = costs, entries
        self.index = {e.node: i for i, e in enumerate(entries)}
        self.base = costs.configs()
        starts = np.cumsum([0] + [len(e.candidates) for e in entries]).tolist()
        self.slices = [slice(a, b) for a, b in zip(starts[:-1], starts[1:], strict=True)]
        self.n = starts[-1]
        self.rows: list[dict[int, float]] = []
        self.lower: list[float] = []
        self.upper: list[float] = []
        for where in self.slices:
            self._row(dict.fromkeys(range(where.start, where.stop), 1.0), 1.0, 1.0)

    def bits(self, node: str | None, kind: str) -> tuple[np.ndarray | float, slice | None]:
        """Bits of ``node``'s kernel/bias/activation: per candidate with the entry's booleans, or a constant."""
        if node in self.index:
            i = self.index[node]
            values = _bits(self.entries[i], kind)
            return (values, self.slices[i]) if np.ptp(values) > 0 else (float(values[0]), None)
        config = self.base.get(node) if node is not None else None
        return (activation_bits(config) if kind == "activation" else weight_bits(config, kind)), None

    def linear(self, terms) -> _Linear:
        """``sum(factor * bits(node, kind))``."""
        coef: dict[int, float] = {}
        constant = 0.0
        for factor, node, kind in terms:
            values, where = self.bits(node, kind)
            if where is None:
                constant += factor * values
            else:
                _add(coef, where, factor * values)
        return coef, constant

    def bops(self) -> _Linear:
        """Total bit operations; a layer with both bit-widths chosen adds its product variables and rows."""
        coef: dict[int, float] = {}
        constant = 0.0
        for t in self.costs.layers:
            (wv, wx), (av, ax) = self.bits(t.node, "kernel"), self.bits(t.input_node, "activation")
            if wx is not None and ax is not None:
                for i in range(len(wv)):
                    for j in range(len(av)):
                        z = self.n
                        self.n += 1
                        coef[z] = t.macs * wv[i] * av[j]
                        self._row({z: 1.0, wx.start + i: -1.0, ax.start + j: -1.0}, -1.0, np.inf)
            elif wx is not None:
                _add(coef, wx, t.macs * av * wv)
            elif ax is not None:
                _add(coef, ax, t.macs * wv * av)
            else:
                constant += t.macs * wv * av
        return coef, constant

    def at_most(self, expression: _Linear, bound: float) -> None:
        coef, constant = expression
        self._row(coef, -np.inf, bound - constant)

    def matrix(self):
        """The rows as a sparse matrix over all variables."""
        from scipy.sparse import csr_array

        rows = [r for r, coef in enumerate(self.rows) for _ in coef]
        cols = [k for coef in self.rows for k in coef]
        values = [v for coef in self.rows for v in coef.values()]
        return csr_array((values, (rows, cols)), shape=(len(self.rows), self.n))

    def _row(self, coef: dict[int, float], lower: float, upper: float) -> None:
        self.rows.append(coef)
        self.lower.append(lower)
        self.upper.append(upper)


def _refine(costs, entries, sensitivity, target, choice: list[int]) -> list[int]:
    """Upgrade bits where sensitivity does not grow and the budget still holds (exact evaluation)."""
    choice = list(choice)

    def configs(ch):
        return {e.node: e.candidates[i] for e, i in zip(entries, ch, strict=True)}

    def more_bits(e: Configurable, a: int, b: int) -> bool:
        ca, cb = e.candidates[a], e.candidates[b]
        wa, wb, aa, ab = weight_bits(ca), weight_bits(cb), activation_bits(ca), activation_bits(cb)
        return wb >= wa and ab >= aa and (wb, ab) != (wa, aa)

    while True:
        best = None
        for i, e in enumerate(entries):
            for c in range(len(e.candidates)):
                if c == choice[i] or not more_bits(e, choice[i], c) or sensitivity[i][c] > sensitivity[i][choice[i]]:
                    continue
                trial = choice[:i] + [c] + choice[i + 1:]
                if costs.evaluate(configs(trial)).exceeds(target):
                    continue
                if best is None or sensitivity[i][c] < best[0]:
                    best = (sensitivity[i][c], i, c)
        if best is None:
            return choice
        choice[best[1]] = best[2]
