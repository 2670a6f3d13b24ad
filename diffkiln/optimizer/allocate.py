"""ILP bit allocation for the mixed recipe: budget splits between the sensitivity groups.

The weight budget (an average over *all* the denoiser's quantizable parameters, FP layers counting
16 bits; by default in stored bits, scales and group multipliers included, as
``Plan.avg_stored_weight_bits`` reports, or in code bits, as ``Plan.avg_weight_bits`` and MixDQ
count) is split between the content and the quality group at several ratios; for each split one
ILP per group (:func:`diffkiln.optimizer.allocation.allocate_bits`) minimizes the group's summed
error. Errors differ in kind between groups (1 - SSIM vs noise power), which is why the split is
searched rather than solved in one program.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from diffkiln.core.packing import PACKABLE_BITS
from diffkiln.core.plan import Plan, WeightSpec
from diffkiln.optimizer.allocation import InfeasibleBudgetError, LayerOptions, allocate_bits
from diffkiln.optimizer.latency import LatencyTable
from diffkiln.optimizer.mixed_config import MixedConfig, WeightBudget
from diffkiln.optimizer.roles import LayerRole
from diffkiln.optimizer.sensitivity import SensitivityTable

__all__ = ["allocate_acts", "allocate_mixed", "check_weight_budget", "weight_spec_for"]


def _options(
    names: Sequence[str],
    table: SensitivityTable,
    candidates: Mapping[str, Sequence[int]],
    target: str,
    ties: Mapping[str, str],
    stored: Mapping[str, Mapping[int, float]] | None = None,
) -> list[LayerOptions]:
    return [
        LayerOptions(
            n,
            table.params[n],
            {b: -table.error(n, target, b) for b in candidates[n]},
            ties.get(n, ""),
            dict((stored or {}).get(n, {})),
        )
        for n in names
    ]


def _stored_bits_per_weight(
    base: Plan, candidates: Mapping[str, Sequence[int]], config: MixedConfig
) -> dict[str, dict[int, float]]:
    """layer -> candidate -> bits the budget charges per weight (``config.budget``).

    ``stored``: the bundle's bits per weight in the format the allocation would give the layer
    (:func:`_weight_spec`, :meth:`~diffkiln.core.plan.LayerPlan.stored_bits_as`);
    ``codes``: the width itself.
    """
    by_name = {lp.name: lp for lp in base.layers}
    if config.budget is WeightBudget.CODES:
        return {n: {b: float(b) for b in c} for n, c in candidates.items()}
    return {
        n: {
            b: by_name[n].stored_bits_as(None if b >= 16 else weight_spec_for(b, config.group_size)) / by_name[n].params
            for b in c
        }
        for n, c in candidates.items()
    }


def _group_avgs(budget: float, groups: Mapping[str, list[LayerOptions]], config: MixedConfig) -> list[dict[str, float]]:
    """The per-group averages to try: the even split first, then content +/- k * split_step."""
    sizes = {g: sum(o.params for o in opts) for g, opts in groups.items() if opts}
    total = sum(sizes.values())
    even = budget / total
    if len(sizes) < 2:
        return [{g: even for g in sizes}]
    lo = {g: sum(o.params * min(map(o.bits, o.scores)) for o in groups[g]) / sizes[g] for g in sizes}
    hi = {g: sum(o.params * max(map(o.bits, o.scores)) for o in groups[g]) / sizes[g] for g in sizes}
    out: list[dict[str, float]] = []
    offsets = sorted(range(-config.splits, config.splits + 1), key=abs)
    for k in offsets:
        a_c = even + k * config.split_step
        a_q = (budget - a_c * sizes["content"]) / sizes["quality"]
        if lo["content"] - 1e-9 <= a_c and lo["quality"] - 1e-9 <= a_q:
            out.append({"content": min(a_c, hi["content"]), "quality": min(a_q, hi["quality"])})
        if len(out) == config.splits:
            break
    return out


def _group_latency_budgets(
    groups: Mapping[str, list[LayerOptions]], latency: LatencyTable | None, config: MixedConfig
) -> dict[str, float | None]:
    """Each group's share of the latency budget: its share of the summed latency at 8 bits."""
    if latency is None or config.latency_budget_ms is None:
        return dict.fromkeys(groups)
    ref = {g: sum(latency.ms.get(o.name, {}).get(8, 0.0) for o in opts) for g, opts in groups.items()}
    total = sum(ref.values()) or 1.0
    return {g: config.latency_budget_ms * ref[g] / total for g in groups}


def check_weight_budget(base: Plan, candidates: Mapping[str, Sequence[int]], config: MixedConfig) -> float:
    """The smallest average weight bits any allocation reaches (every searched layer at its
    cheapest candidate, the layers kept in FP at 16), after checking ``config.avg_weight_bits``
    against it. Needs no sensitivities, so the search refuses an infeasible budget before its
    trials as well as the allocation after them.

    Raises:
        InfeasibleBudgetError: the budget is below that average; the message names it.
    """
    total = sum(lp.params for lp in base.layers)
    stored = _stored_bits_per_weight(base, candidates, config)
    fixed_bits = 16 * sum(lp.params for lp in base.layers if lp.name not in candidates)
    least = sum(lp.params * min(stored[lp.name].values()) for lp in base.layers if lp.name in candidates)
    floor = (fixed_bits + least) / max(total, 1)
    if config.avg_weight_bits * total - fixed_bits < least - 1e-6:
        raise InfeasibleBudgetError(
            f"an average of {config.avg_weight_bits} weight bits is infeasible: with the layers kept in FP and these "
            f"candidates the smallest feasible average is {floor:.3f}; raise --avg-weight-bits or add lower candidates"
        )
    return floor


def allocate_mixed(
    base: Plan,
    table: SensitivityTable,
    candidates: Mapping[str, Sequence[int]],
    config: MixedConfig,
    latency: LatencyTable | None = None,
    ties: Mapping[str, str] | None = None,
) -> list[tuple[dict[str, float], dict[str, int], dict[str, int]]]:
    """The ILP allocations to measure: per budget split, (group averages, weight bits, act bits).

    Args:
        base: the W8A8 base plan (its FP layers are fixed at 16 bits).
        table: the measured sensitivities of every searched layer.
        candidates: layer -> weight candidates (16 included where allowed).
        config: budgets and candidates.
        latency: the measured per-layer latency table, needed for ``config.latency_budget_ms``.
            Default None.
        ties: layer -> tie key of layers that must share a width (used with ``config.tie_qkv``;
            :func:`diffkiln.optimizer.roles.qkv_ties`). Default none.

    Raises:
        InfeasibleBudgetError: the weight (or activation) budget is below the smallest feasible
            average; the message names it.
    """
    floor = check_weight_budget(base, candidates, config)
    total = sum(lp.params for lp in base.layers)
    fixed = [lp for lp in base.layers if lp.name not in candidates]
    managed = [lp.name for lp in base.layers if lp.name in candidates]
    stored = _stored_bits_per_weight(base, candidates, config)
    fixed_bits = 16 * sum(lp.params for lp in fixed)
    budget = config.avg_weight_bits * total - fixed_bits
    # Tied layers are solved in one program: all of them join the group of the first one.
    tie_of = {n: t for n, t in (ties or {}).items() if n in candidates} if config.tie_qkv else {}
    group_of: dict[str, LayerRole] = {}
    first_of_tie: dict[str, LayerRole] = {}
    for n in managed:
        tie = tie_of.get(n, "")
        group_of[n] = first_of_tie.setdefault(tie, table.roles[n]) if tie else table.roles[n]
    groups = {
        role.value: _options([n for n in managed if group_of[n] is role], table, candidates, "weight", tie_of, stored)
        for role in LayerRole
    }
    if config.latency_budget_ms is not None and latency is None:
        raise ValueError("a latency budget needs a measured latency table (diffkiln.optimizer.latency)")
    lat_budgets = _group_latency_budgets(groups, latency, config)
    costs: dict[str, dict[int, float]] | None = None
    if latency is not None:
        # A layer the sampler never calls costs nothing at any width.
        costs = {n: latency.ms.get(n) or dict.fromkeys(candidates[n], 0.0) for n in managed}
    results = []
    errors: list[str] = []
    for avgs in _group_avgs(budget, groups, config):
        wbits: dict[str, int] = {}
        try:
            for g, opts in groups.items():
                if opts:
                    wbits.update(allocate_bits(opts, avgs[g], costs=costs, cost_budget=lat_budgets[g]))
        except InfeasibleBudgetError as exc:
            errors.append(str(exc))
            continue  # ties or the latency bound can make a split infeasible; the others remain
        results.append((avgs, wbits, allocate_acts(base, table, wbits, config)))
    uniform = _uniform_allocation(base, candidates, stored, config, latency) if config.uniform_candidate else None
    if uniform is not None and all(uniform[1] != w for _, w, _ in results):
        width, ubits = uniform
        results.append(({"uniform": float(width)}, ubits, allocate_acts(base, table, ubits, config)))
    if not results:
        raise InfeasibleBudgetError(
            f"no split of {config.avg_weight_bits} average weight bits between the content and quality layers is "
            f"feasible (smallest feasible average: {floor:.3f}); raise --avg-weight-bits"
            + (f" or --latency-budget ({errors[0]})" if config.latency_budget_ms is not None and errors else "")
        )
    return results


def _uniform_allocation(
    base: Plan,
    candidates: Mapping[str, Sequence[int]],
    stored: Mapping[str, Mapping[int, float]],
    config: MixedConfig,
    latency: LatencyTable | None,
) -> tuple[int, dict[str, int]] | None:
    """(width, bits): every searched layer at the widest single width that fits the budgets, or None.

    Layers whose candidates lack that width (conditioning layers: 4, 8 or 16) take their nearest
    wider candidate. A uniform allocation more than one bit below the budget is no rival to the
    ILP's plans and is not returned.
    """
    total = sum(lp.params for lp in base.layers)
    for width in sorted({b for c in candidates.values() for b in c if b < 16}, reverse=True):
        bits = {n: min((b for b in c if b >= width), default=16) for n, c in candidates.items()}
        per_weight = {n: stored[n].get(b, float(b)) for n, b in bits.items()}
        avg = sum(lp.params * per_weight.get(lp.name, 16.0) for lp in base.layers) / total
        fits_latency = (
            config.latency_budget_ms is None or latency is None or latency.total(bits) <= config.latency_budget_ms
        )
        if avg <= config.avg_weight_bits + 1e-9 and fits_latency:
            return (width, bits) if avg >= config.avg_weight_bits - 1.0 else None
    return None


def allocate_acts(base: Plan, table: SensitivityTable, wbits: Mapping[str, int], config: MixedConfig) -> dict[str, int]:
    quantized = [n for n, b in wbits.items() if b < 16]
    with_grid = [n for n in quantized if any(e.layer == n and e.target == "act" for e in table.entries)]
    if config.avg_act_bits is None:
        return {n: 8 if n in with_grid else 16 for n in quantized}
    total = sum(lp.params for lp in base.layers)
    fixed_bits = 16 * sum(lp.params for lp in base.layers if lp.name not in with_grid)
    budget = config.avg_act_bits * total - fixed_bits
    opts = _options(with_grid, table, {n: config.act_candidates for n in with_grid}, "act", {})
    size = sum(o.params for o in opts)
    if not opts:
        return dict.fromkeys(quantized, 16)
    if budget < size * min(config.act_candidates) - 1e-6:
        floor = (fixed_bits + size * min(config.act_candidates)) / total
        raise InfeasibleBudgetError(
            f"an average of {config.avg_act_bits} activation bits is infeasible: layers kept in FP count 16, so the "
            f"smallest feasible average is {floor:.3f}; raise --avg-act-bits"
        )
    abits = allocate_bits(opts, budget / size)
    return {n: abits.get(n, 16) for n in quantized}


def weight_spec_for(bits: int, group_size: int | None) -> WeightSpec:
    """Mixed precision's weights: float16 scales; 4-/2-bit ones grouped when asked."""
    return WeightSpec(bits=bits, scale_dtype="float16", group_size=group_size if bits in PACKABLE_BITS else None)
