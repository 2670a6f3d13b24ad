"""Building the Pareto sweep: mixed bundles at several average weight bits, plus uniform W4A8 and
W8A8 references, all from one calibration and one (cached) sensitivity analysis.

``diffkiln.report.sweep`` then measures and renders them.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path

from diffkiln.api.optimize import OptimizeConfig, Prepared, prepare
from diffkiln.core.cache_schedule import CacheSchedule
from diffkiln.core.errors import InvalidInputError
from diffkiln.core.plan import Plan
from diffkiln.export import ExportConfig, export_bundle
from diffkiln.optimizer import (
    CacheConfig,
    MixedConfig,
    SearchContext,
    SparseConfig,
    WeightBudget,
    for_target,
    make_plan,
    mixed_sensitivity,
    plan_w8a8,
    search_cache,
    search_mixed,
    search_sparse,
    uniform_plan,
)

__all__ = ["SweepBuild", "SweepConfig", "build_cache_sweep", "build_sparse_sweep", "build_sweep"]


@dataclass(frozen=True)
class SweepConfig:
    """What the sweep builds.

    Attributes:
        budgets: the average weight bits to build mixed bundles at. Default (3, 4, 5, 6, 8).
        references: also build uniform W4A8 and W8A8 bundles. Default True.
        match_uniform: with ``references``, also build ``mixed-at-uniform-w4a8``: a mixed bundle
            whose budget is what uniform W4A8 spends, so the two compare at the same bytes.
            Default True.
    """

    budgets: tuple[float, ...] = (3.0, 4.0, 5.0, 6.0, 8.0)
    references: bool = True
    match_uniform: bool = True

    def __post_init__(self) -> None:
        if not self.budgets or any(not 2.0 <= b <= 16.0 for b in self.budgets):
            raise InvalidInputError(f"sweep budgets must be averages within 2..16, got {self.budgets}")


@dataclass(frozen=True)
class SweepBuild:
    """The sweep's bundles, by name (``mixed-w4``, ``uniform-w4a8``, ``w8a8``, ...), with the
    calibrated model they were built from."""

    prepared: Prepared
    bundles: dict[str, Path]
    layers: list[str]


def _plans(prep: Prepared, config: OptimizeConfig, sweep: SweepConfig) -> dict[str, Plan]:
    mixed: MixedConfig = config.resolved_recipe()
    context = prep.context(config)
    base, _, _ = mixed_sensitivity(prep.pipe, prep.stats, mixed, context)
    plans: dict[str, Plan] = {}
    for budget in sweep.budgets:
        cfg = dataclasses.replace(mixed, avg_weight_bits=float(budget))
        try:
            plans[f"mixed-w{budget:g}"] = search_mixed(prep.pipe, prep.stats, cfg, context).plan
        except InvalidInputError as exc:
            raise InvalidInputError(f"--sweep {budget:g}: {exc}") from None
    if sweep.references:
        uniform = uniform_plan(base, 4, group_size=mixed.group_size)
        plans["uniform-w4a8"] = uniform
        plans["w8a8"] = plan_w8a8(prep.pipe, prep.stats, dataclasses.replace(mixed.base_config(), scale_dtype="auto"),
                                  context)  # fmt: skip
        if sweep.match_uniform:
            stored = mixed.budget is WeightBudget.STORED
            spent = uniform.avg_stored_weight_bits if stored else uniform.avg_weight_bits
            # Uniform W4A8 is one point of the search space, so its budget is always feasible.
            matched = search_mixed(prep.pipe, prep.stats, dataclasses.replace(mixed, avg_weight_bits=spent), context)
            plans["mixed-at-uniform-w4a8"] = matched.plan
    return plans


def build_sweep(target: str | os.PathLike[str], config: OptimizeConfig, sweep: SweepConfig) -> SweepBuild:
    """Build the sweep's bundles under ``config.out`` (one folder each).

    Args:
        target: a built-in name or a diffusers folder.
        config: the settings; ``recipe`` must be a :class:`MixedConfig` (the sweep varies its budget).
        sweep: the budgets and references.

    Raises:
        InvalidInputError: ``config.recipe`` is not a MixedConfig, or a budget is infeasible.
    """
    if not isinstance(config.recipe, MixedConfig):
        raise InvalidInputError("--sweep varies the mixed recipe's budget; use --recipe mixed")
    prep = prepare(target, config)
    return _export_all(prep, config, _plans(prep, config, sweep))


def build_cache_sweep(target: str | os.PathLike[str], config: OptimizeConfig, budgets: tuple[float, ...]) -> SweepBuild:
    """Build one bundle per cache budget (``cache-0.5`` ...) under ``config.out``, from one
    calibration: the recipe's plan (FP weights for the cache recipe) with a schedule searched at
    each budget, plus the recipe's bundle without a cache (``uncached``) unless the recipe is the
    cache recipe (FP is then the uncached reference). Attention masks (``config.sparse``, or the
    sparse recipe's) are searched under each bundle's own schedule, as :func:`optimize` does.

    Raises:
        InvalidInputError: a budget outside (0, 1], or one no mechanism fits.
    """
    if not budgets or any(not 0.0 < b <= 1.0 for b in budgets):
        raise InvalidInputError(f"--sweep-cache budgets must be compute fractions in (0, 1], got {budgets}")
    cache_recipe = isinstance(config.recipe, CacheConfig)
    base_cache = config.cache or (config.recipe if cache_recipe else CacheConfig())
    if config.cache is None and not cache_recipe:
        config = dataclasses.replace(config, cache=base_cache)
    base_cache = for_target(base_cache, config.deploy_target)
    prep = prepare(target, config)
    context = prep.context(config)
    plans: dict[str, Plan] = {}
    if not cache_recipe:
        plans["uncached"] = _planned(prep, config, context, None)
    for budget in budgets:
        cache_cfg = dataclasses.replace(base_cache, budget=float(budget))
        if cache_recipe:
            plans[f"cache-{budget:g}"] = _masked(prep, config, make_plan(prep.pipe, prep.stats, cache_cfg, context))
        else:
            schedule = search_cache(prep.pipe, prep.stats, cache_cfg, context)
            plans[f"cache-{budget:g}"] = _planned(prep, config, context, schedule, plans["uncached"])
    return _export_all(prep, config, plans)


def _planned(prep: Prepared, config: OptimizeConfig, context: SearchContext, schedule: CacheSchedule | None,
             made: Plan | None = None) -> Plan:  # fmt: skip
    """The recipe's plan with ``schedule`` (None: no cache) and its masks searched under it.

    ``made``: the recipe's plan made before, reused unless the recipe is the sparse one (its masks
    depend on the schedule; the other recipes' plans do not)."""
    recipe = config.resolved_recipe()
    if made is None or isinstance(recipe, SparseConfig):
        made = make_plan(prep.pipe, prep.stats, recipe, dataclasses.replace(context, cache_schedule=schedule))
    return _masked(prep, config, dataclasses.replace(made, cache=schedule))


def _masked(prep: Prepared, config: OptimizeConfig, plan: Plan) -> Plan:
    """``plan`` with ``config.sparse``'s masks searched under its cache schedule (as it is without)."""
    if config.sparse is None:
        return plan
    masks = search_sparse(prep.pipe, prep.stats, config.sparse, config.progress, plan.cache)
    return dataclasses.replace(plan, sparse=masks)


def _export_all(prep: Prepared, config: OptimizeConfig, plans: dict[str, Plan]) -> SweepBuild:
    """One bundle per plan under ``config.out`` (named as the plans), every one storing floats alike."""
    out = Path(config.out)
    storage = config.resolved_float_storage()
    bundles: dict[str, Path] = {}
    for name, plan in plans.items():
        export_cfg = ExportConfig(
            out / name, overwrite=config.overwrite, float_storage=storage, progress=config.progress
        )
        bundles[name] = export_bundle(prep.pipe, plan, prep.stats, export_cfg)
    return SweepBuild(prep, bundles, [lp.name for lp in next(iter(plans.values())).layers])


def build_sparse_sweep(
    target: str | os.PathLike[str], config: OptimizeConfig, densities: tuple[float, ...]
) -> SweepBuild:
    """Build one bundle per attention density (``sparse-0.35`` ...) under ``config.out``, from one
    calibration: the recipe's plan (FP weights for the sparse recipe) with masks searched at each
    density, plus the recipe's bundle with dense attention (``dense``) unless the recipe is the
    sparse recipe (FP is then the dense reference). A cache schedule (``config.cache``, or the
    cache recipe's) is searched once and goes into every bundle; the masks are searched under it.

    Raises:
        InvalidInputError: a density outside (0, 1], or one no masks reach.
    """
    if not densities or any(not 0.0 < d <= 1.0 for d in densities):
        raise InvalidInputError(f"--sweep-attn densities must be fractions in (0, 1], got {densities}")
    sparse_recipe = isinstance(config.recipe, SparseConfig)
    base_sparse = config.sparse or (config.recipe if sparse_recipe else SparseConfig())
    if config.sparse is None and not sparse_recipe:
        config = dataclasses.replace(config, sparse=base_sparse)
    prep = prepare(target, config)
    context = prep.context(config)
    schedule = None
    if config.cache is not None:
        schedule = search_cache(prep.pipe, prep.stats, for_target(config.cache, config.deploy_target), context)
        context = dataclasses.replace(context, cache_schedule=schedule)
    plans: dict[str, Plan] = {}
    for density in densities:
        sparse_cfg = dataclasses.replace(base_sparse, density=float(density))
        if sparse_recipe:
            plan = make_plan(prep.pipe, prep.stats, sparse_cfg, context)
            plans[f"sparse-{density:g}"] = dataclasses.replace(plan, cache=schedule) if schedule else plan
        else:
            if "dense" not in plans:
                # the cache recipe's plan carries its own schedule
                made = make_plan(prep.pipe, prep.stats, config.resolved_recipe(), context)
                plans["dense"] = dataclasses.replace(made, cache=schedule) if schedule else made
            base = plans["dense"]
            masks = search_sparse(prep.pipe, prep.stats, sparse_cfg, config.progress, base.cache)
            plans[f"sparse-{density:g}"] = dataclasses.replace(base, sparse=masks)
    return _export_all(prep, config, plans)
