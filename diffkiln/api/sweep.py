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
from diffkiln.core.errors import InvalidInputError
from diffkiln.core.plan import Plan
from diffkiln.export import ExportConfig, export_bundle
from diffkiln.optimizer import (
    CacheConfig,
    MixedConfig,
    SparseConfig,
    WeightBudget,
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
    cache recipe (FP is then the uncached reference).

    Raises:
        InvalidInputError: a budget outside (0, 1], one no mechanism fits, or masks asked for too.
    """
    if not budgets or any(not 0.0 < b <= 1.0 for b in budgets):
        raise InvalidInputError(f"--sweep-cache budgets must be compute fractions in (0, 1], got {budgets}")
    if config.sparse is not None or isinstance(config.recipe, SparseConfig):
        # The masks would be searched without the schedule each bundle gets (sparse_search works under one).
        raise InvalidInputError("--sweep-cache sweeps cache schedules alone; drop the attention masks "
                                "(--attn-density, --recipe sparse), or build each budget with --cache-budget B "
                                "--attn-density D")  # fmt: skip
    base_cache = config.cache or (config.recipe if isinstance(config.recipe, CacheConfig) else CacheConfig())
    if config.cache is None and not isinstance(config.recipe, CacheConfig):
        config = dataclasses.replace(config, cache=base_cache)
    prep = prepare(target, config)
    context = prep.context(config)
    plans: dict[str, Plan] = {}
    for budget in budgets:
        cache_cfg = dataclasses.replace(base_cache, budget=float(budget))
        if isinstance(config.recipe, CacheConfig):
            plans[f"cache-{budget:g}"] = make_plan(prep.pipe, prep.stats, cache_cfg, context)
        else:
            base = plans.get("uncached") or make_plan(prep.pipe, prep.stats, config.resolved_recipe(), context)
            plans["uncached"] = base
            schedule = search_cache(prep.pipe, prep.stats, cache_cfg, context)
            plans[f"cache-{budget:g}"] = dataclasses.replace(base, cache=schedule)
    return _export_all(prep, config, plans)


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
    sparse recipe (FP is then the dense reference).

    Raises:
        InvalidInputError: a density outside (0, 1], one no masks reach, or a cache asked for too.
    """
    if not densities or any(not 0.0 < d <= 1.0 for d in densities):
        raise InvalidInputError(f"--sweep-attn densities must be fractions in (0, 1], got {densities}")
    if config.cache is not None or isinstance(config.recipe, CacheConfig):
        raise InvalidInputError("--sweep-attn sweeps attention masks alone; drop the cache schedule "
                                "(--cache-budget, --recipe cache), or build each density with --attn-density D "
                                "--cache-budget B")  # fmt: skip
    sparse_recipe = isinstance(config.recipe, SparseConfig)
    base_sparse = config.sparse or (config.recipe if sparse_recipe else SparseConfig())
    if config.sparse is None and not sparse_recipe:
        config = dataclasses.replace(config, sparse=base_sparse)
    prep = prepare(target, config)
    context = prep.context(config)
    plans: dict[str, Plan] = {}
    for density in densities:
        sparse_cfg = dataclasses.replace(base_sparse, density=float(density))
        if sparse_recipe:
            plans[f"sparse-{density:g}"] = make_plan(prep.pipe, prep.stats, sparse_cfg, context)
        else:
            base = plans.get("dense") or make_plan(prep.pipe, prep.stats, config.resolved_recipe(), context)
            plans["dense"] = base
            masks = search_sparse(prep.pipe, prep.stats, sparse_cfg, config.progress)
            plans[f"sparse-{density:g}"] = dataclasses.replace(base, sparse=masks)
    return _export_all(prep, config, plans)
