"""Pick one candidate per configurable node: least total sensitivity under a resource budget.

An integer program in cvxpy: a boolean per (node, candidate), exactly one per
node; weights memory, activation memory (one constraint per execution step:
the tensors alive there), total memory and BOPS are linear in those booleans
(a layer whose weight bits and input activation bits are both chosen gets a
product variable per candidate pair, linearized).  Solved by HiGHS (through
SciPy's ``milp``, or cvxpy's HiGHS interface), then refined greedily: a node moves to a candidate
with more bits while its sensitivity does not grow and the budget holds.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from mct_fx.mixed_precision.candidates import Configurable
from mct_fx.resources import CostModel, ResourceUtilization, activation_bits, weight_bits
from mct_fx.tpc.schema import OpQuantConfig

__all__ = ["MixedPrecisionError", "solve", "smallest_achievable"]


class MixedPrecisionError(ValueError):
    """The budget cannot be met (the message gives the smallest achievable value) or no solver is available."""


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
    import cvxpy as cp

    x = [cp.Variable(len(e.candidates), boolean=True) for e in entries]
    index = {e.node: i for i, e in enumerate(entries)}
    base = costs.configs()
    constraints = [cp.sum(v) == 1 for v in x]

    def bits(node: str | None, kind: str):
        """Bits of ``node``'s kernel/bias/activation: a constant or an expression in its booleans."""
        if node in index:
            values = _bits(entries[index[node]], kind)
            return (values, x[index[node]]) if np.ptp(values) > 0 else (values[0], None)
        config = base.get(node) if node is not None else None
        return (activation_bits(config) if kind == "activation" else weight_bits(config, kind)), None

    def scaled(factor: float, b) -> object:
        values, var = b
        return factor * values if var is None else (factor * values) @ var

    weights = sum(scaled(t.numel / 8, bits(t.node, t.attribute)) for t in costs.weights)
    fields = dict(target.items())
    if "weights_memory" in fields:
        constraints.append(weights <= fields["weights_memory"])
    if "activation_memory" in fields or "total_memory" in fields:
        for step in costs.steps:
            live = sum(scaled(t.numel / 8, bits(t.node, "activation")) for t in costs.live_at(step))
            if "activation_memory" in fields:
                constraints.append(live <= fields["activation_memory"])
            if "total_memory" in fields:
                constraints.append(weights + live <= fields["total_memory"])
    if "bops" in fields:
        terms = []
        for t in costs.layers:
            (wv, wx), (av, ax) = bits(t.node, "kernel"), bits(t.input_node, "activation")
            if wx is not None and ax is not None:
                z = cp.Variable((len(wv), len(av)), nonneg=True)
                constraints.append(z >= cp.reshape(wx, (len(wv), 1), order="C") @ np.ones((1, len(av)))
                                   + np.ones((len(wv), 1)) @ cp.reshape(ax, (1, len(av)), order="C") - 1)
                terms.append(cp.sum(cp.multiply(t.macs * np.outer(wv, av), z)))
            elif wx is not None:
                terms.append((t.macs * av * wv) @ wx)
            elif ax is not None:
                terms.append((t.macs * wv * av) @ ax)
            else:
                terms.append(t.macs * wv * av)
        constraints.append(sum(terms) <= fields["bops"])
    # scale the objective so that solver tolerances do not see tiny sensitivities as ties
    s = [np.asarray(v, dtype=float) for v in sensitivity]
    scale = max(max(float(np.abs(v).max()) for v in s), 1e-30)
    problem = cp.Problem(cp.Minimize(sum((v / scale) @ xi for v, xi in zip(s, x, strict=True))), constraints)
    _solve(problem, cp)
    if problem.status not in ("optimal", "optimal_inaccurate"):
        raise MixedPrecisionError(f"no choice of candidates meets the target {target} together "
                                  f"(solver status: {problem.status})")
    return [int(np.argmax(v.value)) for v in x]


def _solve(problem, cp) -> None:
    # SciPy's milp is HiGHS too, without the banner cvxpy's own HiGHS interface prints on stdout
    solvers = [s for s in ("SCIPY", "HIGHS") if s in cp.installed_solvers()]
    if not solvers:
        raise MixedPrecisionError("mixed precision needs a MIP solver: install cvxpy with HiGHS or SciPy >= 1.9")
    problem.solve(solver=solvers[0])


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
