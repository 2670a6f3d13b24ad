"""Bit allocation by integer linear programming (pulp + CBC), as in MixDQ and HAWQ-V3.

Formulation (docs/mixed-precision.md):

* one binary ``x[i, b]`` per layer ``i`` and candidate bit-width ``b``; ``sum_b x[i, b] = 1``;
* weight budget: ``sum_i,b params_i * w[i, b] * x[i, b] <= avg_bits * sum_i params_i``, where
  ``w[i, b]`` is the bits stored per weight of layer ``i`` at width ``b``: ``b`` itself when only
  code bits count (16 = FP), or codes plus scales and group multipliers per weight
  (:meth:`diffkiln.core.plan.LayerPlan.stored_bits_as`) when the budget is in stored bytes;
* tied layers (which must share a format, e.g. a fused QKV) take the same bit-width:
  ``x[i, b] = x[j, b]`` for every ``b``;
* optionally, a cost budget (e.g. a latency table measured on the target device):
  ``sum_i,b cost[i, b] * x[i, b] <= cost_budget``;
* objective: maximize ``sum_i,b score[i, b] * x[i, b]``, where a score is higher for a better
  choice (e.g. minus the layer's measured error at that width).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

__all__ = ["InfeasibleBudgetError", "LayerOptions", "allocate_bits", "min_feasible_avg_bits"]


class InfeasibleBudgetError(ValueError):
    """No assignment fits the budget; the message names the smallest feasible average."""


@dataclass(frozen=True)
class LayerOptions:
    """One layer's candidate bit-widths and their scores.

    Attributes:
        name: the layer's qualified name.
        params: its weight parameters (the budget weighs bits by them).
        scores: candidate bit-width -> score (higher is better).
        tie: layers with the same non-empty tie key must take the same bit-width. Default "".
        stored: candidate bit-width -> bits stored per weight at that width (scales and
            multipliers included), for a budget in stored bytes. A candidate missing here costs
            its width. Default empty (the budget counts code bits).
    """

    name: str
    params: int
    scores: Mapping[int, float] = field(default_factory=dict)
    tie: str = ""
    stored: Mapping[int, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.scores:
            raise ValueError(f"{self.name}: no candidate bit-widths")
        if self.params <= 0:
            raise ValueError(f"{self.name}: params must be positive, got {self.params}")
        extra = sorted(set(self.stored) - set(self.scores))
        if extra:
            raise ValueError(f"{self.name}: stored sizes for {extra}, which are not candidates {sorted(self.scores)}")

    def bits(self, width: int) -> float:
        """Bits per weight the budget charges for ``width``: its stored size, else the width itself."""
        return float(self.stored.get(width, width))


def min_feasible_avg_bits(layers: Sequence[LayerOptions]) -> float:
    """The smallest parameter-weighted average reachable (every layer at its cheapest candidate)."""
    total = sum(lo.params for lo in layers)
    return sum(lo.params * min(lo.bits(b) for b in lo.scores) for lo in layers) / total


def allocate_bits(
    layers: Sequence[LayerOptions],
    avg_bits: float,
    time_limit_s: float | None = None,
    costs: Mapping[str, Mapping[int, float]] | None = None,
    cost_budget: float | None = None,
) -> dict[str, int]:
    """Choose each layer's bit-width to maximize the summed score within an average-bits budget.

    Args:
        layers: every layer with its candidates and scores.
        avg_bits: the parameter-weighted average weight bits allowed (e.g. 4.0), as each layer's
            :meth:`LayerOptions.bits` charges them.
        time_limit_s: stop CBC after this many seconds (the best solution found is returned).
            Default None (solve to optimality).
        costs: layer -> candidate -> cost (e.g. measured milliseconds), for a cost budget.
            Default None.
        cost_budget: the summed cost allowed; needs ``costs``. Default None (no cost budget).

    Returns:
        layer name -> chosen bit-width.

    Raises:
        InfeasibleBudgetError: the budget is below the smallest feasible average.
        ValueError: no layers, duplicate names, or tied layers with different candidates.
    """
    import pulp

    if not layers:
        raise ValueError("no layers to allocate bits to")
    names = [lo.name for lo in layers]
    if len(set(names)) != len(names):
        raise ValueError("duplicate layer names")
    floor = min_feasible_avg_bits(layers)
    if avg_bits < floor - 1e-9:
        raise InfeasibleBudgetError(
            f"an average of {avg_bits} weight bits is infeasible: the smallest feasible average with these "
            f"candidates is {floor:.3f} (every layer at its lowest width); raise --weight-bits or add lower candidates"
        )
    if cost_budget is not None:
        if costs is None:
            raise ValueError("a cost budget needs a cost per layer and candidate")
        missing = [lo.name for lo in layers if any(b not in costs.get(lo.name, {}) for b in lo.scores)]
        if missing:
            raise ValueError(f"no cost for every candidate of {missing[:3]}; measure them first")
        cost_floor = sum(min(costs[lo.name][b] for b in lo.scores) for lo in layers)
        if cost_budget < cost_floor - 1e-9:
            raise InfeasibleBudgetError(
                f"a cost budget of {cost_budget:.3f} is infeasible: the cheapest choice per layer sums to "
                f"{cost_floor:.3f}; raise the budget (e.g. --latency-budget)"
            )
    ties: dict[str, list[LayerOptions]] = {}
    for lo in layers:
        if lo.tie:
            ties.setdefault(lo.tie, []).append(lo)
    for key, members in ties.items():
        if len({tuple(sorted(m.scores)) for m in members}) > 1:
            raise ValueError(f"tied layers {[m.name for m in members]} (tie {key!r}) need the same candidates")

    prob = pulp.LpProblem("diffkiln_bits", pulp.LpMaximize)
    x = {(i, b): pulp.LpVariable(f"x_{i}_{b}", cat="Binary") for i, lo in enumerate(layers) for b in sorted(lo.scores)}
    prob += pulp.lpSum(layers[i].scores[b] * v for (i, b), v in x.items())
    for i, lo in enumerate(layers):
        prob += pulp.lpSum(x[i, b] for b in lo.scores) == 1
    total = sum(lo.params for lo in layers)
    prob += pulp.lpSum(layers[i].params * layers[i].bits(b) * v for (i, b), v in x.items()) <= avg_bits * total
    if cost_budget is not None and costs is not None:
        prob += pulp.lpSum(costs[layers[i].name][b] * v for (i, b), v in x.items()) <= cost_budget
    index = {lo.name: i for i, lo in enumerate(layers)}
    for members in ties.values():
        first = index[members[0].name]
        for m in members[1:]:
            for b in m.scores:
                prob += x[index[m.name], b] == x[first, b]
    solver = pulp.PULP_CBC_CMD(msg=False, timeLimit=time_limit_s)
    status = prob.solve(solver)
    if pulp.LpStatus[status] != "Optimal" and time_limit_s is None:
        raise InfeasibleBudgetError(
            f"the solver found no assignment within {avg_bits} average bits ({pulp.LpStatus[status]}); tied layers "
            f"can make budgets above {floor:.3f} infeasible too: raise --weight-bits"
        )
    return {lo.name: next(b for b in lo.scores if (x[i, b].value() or 0) > 0.5) for i, lo in enumerate(layers)}
