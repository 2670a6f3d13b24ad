"""Calibration: run the FP pipeline on prompts and record per-layer, per-timestep statistics."""

from diffkiln.calibrate.hooks import HookRegistry, scoped_hooks
from diffkiln.calibrate.stats import (
    CalibrationConfig,
    CalibrationStats,
    LayerStats,
    calibrate,
    calibrate_denoiser,
    find_denoiser,
    find_quantizable_layers,
    pipeline_weight_hash,
)

__all__ = [
    "CalibrationConfig",
    "CalibrationStats",
    "HookRegistry",
    "LayerStats",
    "calibrate",
    "calibrate_denoiser",
    "find_denoiser",
    "find_quantizable_layers",
    "pipeline_weight_hash",
    "scoped_hooks",
]
