"""Pick one option per unit, total cost within a budget, total error least: the multiple-choice
knapsack, solved by the greedy on its linear relaxation (Sinha and Zoltners, 1979).

1. Each unit's options are cut to their lower convex hull in (cost, error): an option that costs
   more and errs no less, or lies above the line between two others, is never the relaxation's pick.
2. Every unit starts at its cheapest option; upgrades along the hulls are taken in order of error
   saved per unit of cost while they fit. The relaxation's optimum takes the first upgrade that does
   not fit in part, so the error at that point minus that part's saving is a lower bound on the
   optimum (reported, so a caller can say how far from optimal the answer may be).
3. The budget left is filled with the single-unit changes (to any option) that save the most error.

Why not an integer program: CBC proves optimality slowly on these problems (near-tied units, one
budget row; docs/sparse-attention.md has the comparison) and the errors are themselves an additive
estimate, so the last fraction of a percent an exact solver wins means nothing. The greedy runs in
``O(options log options)``.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["Choice", "choose_within_budget"]


@dataclass(frozen=True)
class Choice:
    """The knapsack's answer.

    Attributes:
        picks: per unit, the index of its chosen option.
        cost: the chosen options' total cost.
        error: the chosen options' total error.
        lower_bound: no choice within the budget errs less than this.
    """

    picks: tuple[int, ...]
    cost: float
    error: float
    lower_bound: float


def _hull(costs: Sequence[float], errors: Sequence[float]) -> list[int]:
    """The indices of a unit's lower convex hull in (cost, error), cheapest first."""
    order = sorted(range(len(costs)), key=lambda i: (costs[i], errors[i]))
    hull: list[int] = []
    for i in order:
        if hull and errors[i] >= errors[hull[-1]]:
            continue  # costs at least as much and errs no less
        while len(hull) >= 2:
            a, b = hull[-2], hull[-1]
            # b lies on or above the segment from a to i: the relaxation never stops at b.
            if (errors[b] - errors[a]) * (costs[i] - costs[b]) >= (errors[i] - errors[b]) * (costs[b] - costs[a]):
                hull.pop()
            else:
                break
        hull.append(i)
    return hull


def choose_within_budget(costs: Sequence[Sequence[float]], errors: Sequence[Sequence[float]], budget: float) -> Choice:
    """One option per unit (``costs[u][k]``, ``errors[u][k]``), total cost at most ``budget``,
    total error small (see the module docstring).

    Raises:
        ValueError: a unit without options, costs and errors of different lengths, or a budget
            below the cheapest options' total.
    """
    if len(costs) != len(errors) or any(len(c) != len(e) or not c for c, e in zip(costs, errors, strict=True)):
        raise ValueError("every unit needs at least one option, with as many costs as errors")
    hulls = [_hull(c, e) for c, e in zip(costs, errors, strict=True)]
    at = [0] * len(costs)
    picks = [h[0] for h in hulls]
    spent = sum(costs[u][k] for u, k in enumerate(picks))
    if spent > budget * (1 + 1e-12):
        raise ValueError(f"the cheapest options cost {spent:.6g}, above the budget {budget:.6g}")
    heap: list[tuple[float, int]] = []

    def push(u: int) -> None:
        h = hulls[u]
        if at[u] + 1 < len(h):
            a, b = h[at[u]], h[at[u] + 1]
            heapq.heappush(heap, (-(errors[u][a] - errors[u][b]) / (costs[u][b] - costs[u][a]), u))

    for u in range(len(costs)):
        push(u)
    fractional_saving = 0.0
    relaxation_done = False
    while heap:
        _, u = heapq.heappop(heap)
        a, b = hulls[u][at[u]], hulls[u][at[u] + 1]
        step = costs[u][b] - costs[u][a]
        if spent + step <= budget:
            spent += step
            at[u] += 1
            picks[u] = b
            push(u)
        elif not relaxation_done:
            # The relaxation's optimum: this upgrade in part, nothing after it.
            fractional_saving = (budget - spent) / step * (errors[u][a] - errors[u][b])
            relaxation_done = True
    greedy_error = sum(errors[u][k] for u, k in enumerate(picks))
    lower_bound = greedy_error - fractional_saving if relaxation_done else greedy_error
    while True:  # fill what is left of the budget, best single change first
        best: tuple[float, int, int] | None = None
        for u, (c, e) in enumerate(zip(costs, errors, strict=True)):
            now = picks[u]
            for k in range(len(c)):
                saving = e[now] - e[k]
                if saving > 0 and spent + c[k] - c[now] <= budget and (best is None or saving > best[0]):
                    best = (saving, u, k)
        if best is None:
            break
        _, u, k = best
        spent += costs[u][k] - costs[u][picks[u]]
        picks[u] = k
    error = sum(errors[u][k] for u, k in enumerate(picks))
    return Choice(tuple(picks), spent, error, min(lower_bound, error))
