"""diffkiln's public API: one verb per stage, in memory and on disk.

In memory, on any denoiser (a pipeline's, or a bare ``nn.Module`` in your own serving code)::

    import diffkiln.api as dk

    stats = dk.calibrate(module, inputs=[{"hidden_states": x, "timestep": t, ...}, ...])
    plan = dk.make_plan(module, stats, dk.W8A8Config())          # or dk.MixedConfig(avg_weight_bits=4)
    dk.quantize_(module, plan, stats)                            # integer modules, in place
    dk.export_bundle(fp_module, plan, stats, dk.ExportConfig(out))  # a bundle of that module alone
    dk.load_into(my_module, out)                                 # ... put back into your own object

On a pipeline: ``dk.calibrate(pipe, dk.CalibrationConfig(prompts))``, the same ``make_plan`` and
``export_bundle``, then ``dk.load(bundle)`` for a diffusers pipeline on integer kernels; or
:func:`optimize` for all of it from a built-in name or a diffusers folder.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from diffkiln.api.optimize import OptimizeConfig, Prepared, optimize, prepare, sensitivity
from diffkiln.api.sweep import SweepBuild, SweepConfig, build_cache_sweep, build_sparse_sweep, build_sweep
from diffkiln.calibrate import CalibrationConfig, CalibrationStats, InputFiles, calibrate
from diffkiln.core.plan import Plan
from diffkiln.export import ExportConfig, FloatStorage, convert_bundle, export_bundle
from diffkiln.nn import apply_plan
from diffkiln.optimizer import CacheConfig, MixedConfig, SearchContext, SparseConfig, W8A8Config, make_plan
from diffkiln.runtime import load, load_into, open_bundle

__all__ = [
    "CacheConfig",
    "CalibrationConfig",
    "CalibrationStats",
    "ExportConfig",
    "FloatStorage",
    "InputFiles",
    "MixedConfig",
    "OptimizeConfig",
    "Plan",
    "Prepared",
    "SearchContext",
    "SparseConfig",
    "SweepBuild",
    "SweepConfig",
    "W8A8Config",
    "build_cache_sweep",
    "build_sparse_sweep",
    "build_sweep",
    "calibrate",
    "convert",
    "export_bundle",
    "load",
    "load_into",
    "make_plan",
    "optimize",
    "prepare",
    "quantize_",
    "sensitivity",
]


def quantize_(model: Any, plan: Plan, stats: CalibrationStats) -> Any:
    """Swap the plan's integer modules into ``model``'s denoiser, in place (torchao's ``quantize_``).

    Args:
        model: the FP pipeline or bare module the plan was made for.
        plan: the plan (:func:`make_plan`).
        stats: the calibration statistics it was made from.

    Returns:
        ``model``.
    """
    return apply_plan(model, plan, stats, inplace=True)


def convert(bundle: str | Path, config: Any) -> Path:
    """Write a bundle in another format: ``convert(bundle, OnnxExportConfig(out))`` or
    ``MindieExportConfig(out)`` (formats are registered by config type).

    Raises:
        BundleError: the bundle fails its checks.
        InvalidInputError: no format for the config's type.
    """
    return convert_bundle(open_bundle(bundle), config)
