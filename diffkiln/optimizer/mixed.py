"""The mixed-precision recipe: sensitivities -> ILP bit allocation -> the best measured plan (MixDQ).

1. A W8A8 base plan gives every layer its static activation grid, smoothing and BOS rows. The
   conditioning embedders the W8A8 recipe keeps in FP join the search with the candidates 4, 8
   and 16 only (their error reaches every token); input/output projections, ``exclude`` and the
   layers that can never be quantized stay in FP.
2. :func:`diffkiln.optimizer.sensitivity.analyze_sensitivity` measures each layer alone at each
   candidate, content layers by the final outputs, quality layers by denoiser-output SQNR (the
   groups come from the data flow: :func:`diffkiln.optimizer.roles.sensitivity_groups`).
3. :func:`diffkiln.optimizer.allocate.allocate_mixed` splits the budget between the groups at
   several ratios and solves one ILP per group and split.
4. Each split's plan is built and run on the real integer modules over the selection samples; the
   plan whose final outputs are closest to FP wins (:func:`select_candidate`).

Activations: without an activation budget every quantized layer keeps 8-bit activations (W*A8).
With one, a second ILP chooses 8 or 16 (weight-only) per layer.
"""

from __future__ import annotations

import copy
import dataclasses
import fnmatch
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from diffkiln.calibrate.stats import CalibrationStats
from diffkiln.core.configs import config_to_dict
from diffkiln.core.errors import InvalidInputError
from diffkiln.core.layers import find_quantizable_layers
from diffkiln.core.plan import LayerPlan, Plan
from diffkiln.nn.freeze import apply_plan
from diffkiln.optimizer.allocate import allocate_mixed, check_weight_budget, weight_spec_for
from diffkiln.optimizer.allocation import InfeasibleBudgetError
from diffkiln.optimizer.latency import measure_layer_latency
from diffkiln.optimizer.mixed_config import MixedConfig, WeightBudget
from diffkiln.optimizer.registry import SearchContext, register_recipe
from diffkiln.optimizer.roles import StructuralRole, qkv_ties, sensitivity_groups, structural_roles
from diffkiln.optimizer.sensitivity import SensitivityConfig, SensitivityTable, analyze_sensitivity
from diffkiln.optimizer.simulate import layer_sims
from diffkiln.optimizer.w8a8 import plan_w8a8, stats_denoiser
from diffkiln.optimizer.workload import Workload, build_workload

log = logging.getLogger(__name__)

__all__ = [
    "MixedConfig",
    "MixedResult",
    "WeightBudget",
    "make_mixed_plan",
    "mixed_sensitivity",
    "search_mixed",
    "select_candidate",
    "uniform_plan",
]

# Conditioning layers (timestep/text embedders): their error reaches every token, so no ternary
# (2-bit) codes; 4 bits is what the uniform W4A8 reference gives them too.
_RESTRICTED_CANDIDATES = (4, 8, 16)


@dataclass(frozen=True)
class MixedResult:
    """A mixed plan with what the search measured.

    Attributes:
        plan: the chosen plan.
        table: the sensitivities it was allocated from.
        candidates: per split tried: the group averages, the plan's average bits and the measured
            mean score of its final outputs against FP (real integer modules).
        chosen: index of the chosen candidate.
    """

    plan: Plan
    table: SensitivityTable
    candidates: list[dict[str, Any]] = field(default_factory=list)
    chosen: int = 0


def _mixed_layers(
    base: Plan, wbits: Mapping[str, int], abits: Mapping[str, int], group_size: int | None = None
) -> tuple[LayerPlan, ...]:
    out = []
    for lp in base.layers:
        w = wbits.get(lp.name, 16)
        if w >= 16 or lp.weight is None:
            if lp.quantized:
                lp = dataclasses.replace(lp, weight=None, act=None, bos_positions=(), reason="kept in FP by the ILP",
                                         smooth_alpha=None)  # fmt: skip
            out.append(lp)
            continue
        act = lp.act if abits.get(lp.name, 16) < 16 else None
        out.append(
            dataclasses.replace(
                lp, weight=weight_spec_for(w, group_size), act=act, smooth_alpha=lp.smooth_alpha if act else None
            )
        )
    return tuple(out)


def uniform_plan(base: Plan, weight_bits: int, act: bool = True, group_size: int | None = None) -> Plan:
    """Every layer the base plan quantizes at ``weight_bits`` (e.g. uniform W4A8), for comparison.

    Args:
        base: the W8A8 base plan.
        weight_bits: 2, 3, 4 or 8.
        act: keep 8-bit activations (False: weight-only). Default True.
        group_size: two-level groups for 4-/2-bit weights. Default None (per channel).
    """
    wbits = {lp.name: weight_bits for lp in base.layers if lp.quantized}
    abits = {n: 8 if act else 16 for n in wbits}
    return dataclasses.replace(base, recipe=f"uniform-w{weight_bits}a{8 if act else 16}",
                               layers=_mixed_layers(base, wbits, abits, group_size))  # fmt: skip


def _measure_plan(model: Any, plan: Plan, stats: CalibrationStats, workload: Workload) -> np.ndarray:
    """Per-sample scores of the plan's final outputs against FP's, on the integer modules."""
    qmodel = apply_plan(copy.deepcopy(model), plan, stats, inplace=True)
    scores = workload.scores(workload.final(qmodel))
    del qmodel
    return scores


def select_candidate(per_sample: Sequence[np.ndarray], confidence: float) -> int:
    """The index of the plan to keep, from each candidate's per-sample scores (same samples, in order).

    The first candidate (the split nearest the even one) stands unless the candidate with the best
    mean beats it by more than ``confidence`` standard errors of their paired per-sample
    differences: a deliberate deviation from the even split must be measurably better, since a
    few samples' SSIM does not track content.

    Args:
        per_sample: one array per candidate.
        confidence: the margin in standard errors; 0 takes the best mean.

    Raises:
        ValueError: no candidates, or arrays of different lengths.
    """
    if not per_sample or len({len(a) for a in per_sample}) != 1:
        raise ValueError("need one per-sample score array per candidate, all of the same length")
    best = int(np.argmax([float(np.mean(a)) for a in per_sample]))
    diff = np.asarray(per_sample[best], dtype=np.float64) - np.asarray(per_sample[0], dtype=np.float64)
    se = float(np.std(diff, ddof=1) / np.sqrt(len(diff))) if len(diff) > 1 else 0.0
    return best if float(np.mean(diff)) > confidence * se else 0


def _announce_budget(base: Plan, candidates: dict[str, tuple[int, ...]], config: MixedConfig) -> None:
    """Say the budget the search resolved before its minutes start, and refuse an infeasible one
    now rather than after the sensitivity trials."""
    try:
        floor = check_weight_budget(base, candidates, config)
    except InfeasibleBudgetError as exc:
        raise InvalidInputError(str(exc)) from None
    acts = "8-bit on every quantized layer" if config.avg_act_bits is None else f"average {config.avg_act_bits} bits"
    widths = ",".join(str(b) for b in config.weight_candidates)
    log.info(
        "mixed: searching %d layers for an average of %g weight bits (%s bits; feasible from %.3f), "
        "candidates %s, activations %s",
        len(candidates), config.avg_weight_bits, config.budget.value, floor, widths, acts,
    )  # fmt: skip


def mixed_sensitivity(
    model: Any, stats: CalibrationStats, config: MixedConfig, context: SearchContext
) -> tuple[Plan, SensitivityTable, dict[str, tuple[int, ...]]]:
    """Steps 1 and 2 of the search: the W8A8 base plan, and every searched layer's sensitivities.

    Returns:
        (base plan, sensitivity table, layer -> its weight candidates including 16 where allowed).
    """
    denoiser = stats_denoiser(model, stats)
    roles = structural_roles(denoiser, stats.graph)
    conditioning = tuple(n for n, r in roles.items() if r.role is StructuralRole.CONDITIONING)
    base_cfg = config.base_config()
    # Conditioning embedders join the search (restricted); the base only lends activation grids.
    base = plan_w8a8(model, stats, dataclasses.replace(base_cfg, include=(*base_cfg.include, *conditioning)), context)
    restricted = {n for n in conditioning if not any(fnmatch.fnmatchcase(n, g) for g in config.include)}
    candidates: dict[str, tuple[int, ...]] = {}
    for lp in base.layers:
        if lp.quantized:
            allowed = _RESTRICTED_CANDIDATES if lp.name in restricted else config.weight_candidates
            candidates[lp.name] = tuple(b for b in config.weight_candidates if b in allowed) or (16,)
    if stats.graph is None:
        raise InvalidInputError("the mixed recipe needs statistics with a traced data flow; recalibrate")
    _announce_budget(base, candidates, config)
    groups = sensitivity_groups(stats.graph, find_quantizable_layers(denoiser), config.content, config.quality)
    sens = SensitivityConfig(
        weight_candidates=tuple(sorted({b for c in candidates.values() for b in c if b < 16})) or (8,),
        act_candidates=(8,),
        prompts=config.sensitivity_prompts,
        quality_steps=config.quality_steps,
        workers=config.workers,
        cache_dir=context.cache_dir,
        progress=context.progress,
        group_size=config.group_size,
    )
    table = analyze_sensitivity(
        model,
        stats,
        base,
        groups,
        layer_sims(base, stats, denoiser),
        {n: [b for b in c if b < 16] for n, c in candidates.items()},
        sens,
        reload=context.reload,
        inputs=context.inputs,
    )
    return base, table, candidates


def search_mixed(model: Any, stats: CalibrationStats, config: MixedConfig, context: SearchContext) -> MixedResult:
    """Search a mixed-precision plan (see the module docstring) and report what was measured.

    Raises:
        InvalidInputError: the budget cannot be met (the message names the smallest feasible one).
    """
    base, table, candidates = mixed_sensitivity(model, stats, config, context)
    latency = (
        measure_layer_latency(model, base, stats, candidates, config.latency_device, group_size=config.group_size)
        if config.latency_budget_ms is not None
        else None
    )
    ties = qkv_ties(stats.graph) if stats.graph is not None else {}
    try:
        allocations = allocate_mixed(base, table, candidates, config, latency, ties)
    except InfeasibleBudgetError as exc:
        raise InvalidInputError(str(exc)) from None
    workload = build_workload(model, stats, config.select_prompts, 1, context.inputs)
    measured: list[dict[str, Any]] = []
    plans: list[Plan] = []
    scores: list[np.ndarray] = []
    with tqdm(allocations, desc="mixed search: measuring plans", unit="plan", disable=not context.progress) as bar:
        for avgs, wbits, abits in bar:
            layers = _mixed_layers(base, wbits, abits, config.group_size)
            plan = dataclasses.replace(base, recipe="mixed", layers=layers)
            scores.append(_measure_plan(model, plan, stats, workload))
            plans.append(plan)
            measured.append({
                "group_avg_bits": {g: round(a, 3) for g, a in avgs.items()},
                "avg_weight_bits": round(plan.avg_weight_bits, 3),
                "avg_stored_weight_bits": round(plan.avg_stored_weight_bits, 3),
                "avg_act_bits": round(plan.avg_act_bits, 3),
                "score": round(float(np.mean(scores[-1])), 5),
                "score_per_sample": [round(float(v), 5) for v in scores[-1]],
            })  # fmt: skip
    chosen = select_candidate(scores, config.select_confidence)
    notes = {
        **base.notes,
        "recipe": "mixed",
        "recipe_config": config_to_dict(config),
        "mixed": {
            "candidates_measured": measured,
            "chosen": chosen,
            "selection": (
                f"mean {workload.metric} of final outputs vs FP, integer modules, {len(workload.reference)} "
                f"calibration samples; the first candidate unless the best beats it by > "
                f"{config.select_confidence:g} paired standard errors"
            ),
            "sensitivity": {k: v for k, v in table.settings.items() if k != "format"},
        },
    }
    return MixedResult(dataclasses.replace(plans[chosen], notes=notes), table, measured, chosen)


@register_recipe("mixed", MixedConfig, float_storage="float16")
def make_mixed_plan(model: Any, stats: CalibrationStats, config: MixedConfig, context: SearchContext) -> Plan:
    """The mixed recipe's plan (:func:`search_mixed`'s chosen plan)."""
    return search_mixed(model, stats, config, context).plan
