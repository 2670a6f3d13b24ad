"""Optimizer: quantizers and planning -> a Plan (pure data)."""

from diffkiln.core.plan import ActMode, ActSpec, LayerPlan, Plan, PlanError, WeightSpec
from diffkiln.core.quantizers import ClipMethod, choose_act_params, quantize_weight_per_channel
from diffkiln.optimizer.planner import QuantizeConfig, Recipe, SmoothMode, fp_default_reasons, make_plan

__all__ = [
    "ActMode",
    "ActSpec",
    "ClipMethod",
    "LayerPlan",
    "Plan",
    "PlanError",
    "QuantizeConfig",
    "Recipe",
    "SmoothMode",
    "WeightSpec",
    "choose_act_params",
    "fp_default_reasons",
    "make_plan",
    "quantize_weight_per_channel",
]
