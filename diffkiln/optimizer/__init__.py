"""Optimizer: recipes, registered by config type, turn calibration statistics into a Plan (pure data).

``make_plan(model, stats, W8A8Config())`` or ``make_plan(model, stats, MixedConfig(...))``; the
Plan itself is defined in :mod:`diffkiln.core.plan`, the contract between stages.
"""

from diffkiln.optimizer.allocation import InfeasibleBudgetError
from diffkiln.optimizer.cache_search import CacheConfig, plan_cache, search_cache
from diffkiln.optimizer.mixed import MixedResult, make_mixed_plan, mixed_sensitivity, search_mixed, uniform_plan
from diffkiln.optimizer.mixed_config import MixedConfig, WeightBudget
from diffkiln.optimizer.registry import (
    SearchContext,
    make_plan,
    recipe_config_from_options,
    recipe_config_type,
    recipe_float_storage,
    recipe_name,
    recipe_names,
    register_recipe,
)
from diffkiln.optimizer.roles import LayerRole, RoleFinding, StructuralRole, structural_roles
from diffkiln.optimizer.sensitivity import SensitivityConfig, SensitivityTable
from diffkiln.optimizer.sparse_search import SparseConfig, plan_sparse, search_masks, search_sparse
from diffkiln.optimizer.targets import TARGETS, for_target
from diffkiln.optimizer.w8a8 import SmoothMode, W8A8Config, fp_reasons, plan_w8a8

__all__ = [
    "TARGETS",
    "CacheConfig",
    "InfeasibleBudgetError",
    "LayerRole",
    "MixedConfig",
    "MixedResult",
    "RoleFinding",
    "SearchContext",
    "SensitivityConfig",
    "SensitivityTable",
    "SmoothMode",
    "SparseConfig",
    "StructuralRole",
    "W8A8Config",
    "WeightBudget",
    "for_target",
    "fp_reasons",
    "make_mixed_plan",
    "make_plan",
    "mixed_sensitivity",
    "plan_cache",
    "plan_sparse",
    "plan_w8a8",
    "recipe_config_from_options",
    "recipe_config_type",
    "recipe_float_storage",
    "recipe_name",
    "recipe_names",
    "register_recipe",
    "search_cache",
    "search_masks",
    "search_mixed",
    "search_sparse",
    "structural_roles",
    "uniform_plan",
]
