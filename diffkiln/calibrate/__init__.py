"""Calibration: run the FP pipeline (or a bare module) and record per-layer, per-step statistics."""

from diffkiln.calibrate.stats import (
    CalibrationConfig,
    CalibrationStats,
    LayerStats,
    calibrate,
    calibrate_denoiser,
)

__all__ = ["CalibrationConfig", "CalibrationStats", "LayerStats", "calibrate", "calibrate_denoiser"]
