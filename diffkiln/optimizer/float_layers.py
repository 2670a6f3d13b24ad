"""The layer plans of recipes that keep every weight in floating point (cache, sparse)."""

from __future__ import annotations

from typing import Any

import torch

from diffkiln.calibrate.stats import CalibrationStats
from diffkiln.core.layers import find_quantizable_layers, layer_kind
from diffkiln.core.pipelines import find_denoiser
from diffkiln.core.plan import LayerPlan

__all__ = ["float_layer_plans"]


def float_layer_plans(model: Any, stats: CalibrationStats, reason: str) -> tuple[LayerPlan, ...]:
    """One float :class:`LayerPlan` per quantizable layer of the calibrated denoiser, with ``reason``."""
    denoiser = find_denoiser(model, stats.denoiser or None) if not isinstance(model, torch.nn.Module) else model
    layers = []
    for name, module in find_quantizable_layers(denoiser).items():
        weight: torch.Tensor = module.weight  # type: ignore[assignment]
        layers.append(LayerPlan(name, layer_kind(module) or "", None, None, (), reason, weight.numel(),
                                out_channels=int(weight.shape[0])))  # fmt: skip
    return tuple(layers)
