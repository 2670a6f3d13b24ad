"""``optimize``: the whole build in one call: load -> calibrate -> plan -> export a bundle.

Each stage is also a verb of its own (``diffkiln.calibrate.calibrate``,
``diffkiln.optimizer.make_plan``, ``diffkiln.export.export_bundle``, ``diffkiln.runtime.load``);
this module only strings them together with the settings ``diffkiln optimize`` takes.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

from diffkiln.calibrate import CalibrationConfig, calibrate
from diffkiln.calibrate.prompts import default_calibration_prompts
from diffkiln.errors import InvalidInputError
from diffkiln.export import ExportConfig, export_bundle
from diffkiln.generation import load_pipeline, read_prompts
from diffkiln.optimizer import ActMode, QuantizeConfig, Recipe, SmoothMode, make_plan
from diffkiln.zoo.registry import default_cache_dir, resolve_target

__all__ = ["OptimizeConfig", "default_cache_dir", "optimize"]


@dataclass(frozen=True)
class OptimizeConfig:
    """Everything ``diffkiln optimize`` takes.

    Attributes:
        out: the bundle directory to write.
        recipe: compression recipe. Default W8A8.
        calib_prompts: a prompts file; None uses ``calib_size`` default prompts. Default None.
        calib_size: number of default calibration prompts. Default 32.
        steps: sampler steps for calibration; None takes the model's default.
        guidance: guidance scale for calibration; None takes the model's default.
        include: globs of layers to quantise although kept in FP by default.
        exclude: globs of layers to keep in FP.
        bos_aware: precompute BOS rows in FP (MixDQ). Default True.
        act_mode: static or dynamic activations. Default static.
        weight_bits: weight grid, 8 or 7 (see :class:`diffkiln.optimizer.QuantizeConfig`). Default 8.
        act_bits: static activation grid, 8 or 7. Default 8.
        smooth: which Linear layers get SmoothQuant smoothing. Default AUTO.
        smooth_alpha: smoothing strength in (0, 1). Default 0.5.
        timestep_aware: one static activation range per sampler step. Default False.
        overwrite: replace an existing bundle. Default False.
        cache_dir: calibration cache; None uses :func:`default_cache_dir`.
        seed: base seed for calibration. Default 0.
        progress: show progress bars. Default True.
    """

    out: Path
    recipe: Recipe = Recipe.W8A8
    calib_prompts: Path | None = None
    calib_size: int = 32
    steps: int | None = None
    guidance: float | None = None
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    bos_aware: bool = True
    act_mode: ActMode = ActMode.STATIC
    weight_bits: int = 8
    act_bits: int = 8
    smooth: SmoothMode = SmoothMode.AUTO
    smooth_alpha: float = 0.5
    timestep_aware: bool = False
    overwrite: bool = False
    cache_dir: Path | None = None
    seed: int = 0
    progress: bool = True

    def __post_init__(self) -> None:
        if self.calib_size <= 0:
            raise InvalidInputError(f"calib_size must be a positive integer, got {self.calib_size}")
        if self.steps is not None and self.steps <= 0:
            raise InvalidInputError(f"steps must be a positive integer, got {self.steps}")
        if self.guidance is not None and self.guidance < 0:
            raise InvalidInputError(f"guidance must be >= 0, got {self.guidance}")
        if not 0.0 < self.smooth_alpha < 1.0:
            raise InvalidInputError(f"smooth_alpha must be in (0, 1), e.g. 0.5; got {self.smooth_alpha}")
        if self.timestep_aware and self.act_mode is not ActMode.STATIC:
            raise InvalidInputError("--timestep-aware needs static activations; drop --act-mode dynamic")
        if self.act_bits != 8 and self.act_mode is not ActMode.STATIC:
            raise InvalidInputError("7-bit activations need static activations; drop --act-mode dynamic")
        for name in ("weight_bits", "act_bits"):
            if getattr(self, name) not in (7, 8):
                raise InvalidInputError(f"{name} must be 7 or 8, got {getattr(self, name)}")


def optimize(target: str | os.PathLike[str], config: OptimizeConfig) -> Path:
    """Build a bundle for ``target`` (a built-in name or a diffusers folder).

    Returns:
        The bundle directory.

    Raises:
        ModelNotFoundError: the target does not resolve.
        InvalidInputError: bad settings or prompts file.
        BundleError: the output exists and ``overwrite`` is False.
    """
    from diffkiln.runtime.manifest import BundleError

    if Path(config.out).exists() and not config.overwrite:
        raise BundleError(f"{config.out} already exists; pass --overwrite to replace it")
    resolved = resolve_target(target)
    builtin = resolved.builtin
    prompts = (
        read_prompts(config.calib_prompts)
        if config.calib_prompts
        else default_calibration_prompts(builtin.judge.value if builtin else None, config.calib_size)
    )
    steps = config.steps or (builtin.default_steps if builtin else 20)
    guidance = config.guidance if config.guidance is not None else (builtin.default_guidance if builtin else 5.0)
    t0 = time.perf_counter()
    pipe = load_pipeline(resolved)
    cal_cfg = CalibrationConfig(
        tuple(prompts),
        steps=steps,
        guidance=guidance,
        seed=config.seed,
        cache_dir=config.cache_dir or default_cache_dir(),
        progress=config.progress,
        call_kwargs=tuple(resolved.call_kwargs.items()),
    )
    t1 = time.perf_counter()
    stats = calibrate(pipe, cal_cfg)
    t2 = time.perf_counter()
    qcfg = QuantizeConfig(
        recipe=config.recipe,
        act_mode=config.act_mode,
        include=config.include,
        exclude=config.exclude,
        bos_aware=config.bos_aware,
        weight_bits=config.weight_bits,
        act_bits=config.act_bits,
        smooth=config.smooth,
        smooth_alpha=config.smooth_alpha,
        timestep_aware=config.timestep_aware,
    )
    plan = make_plan(pipe, stats, qcfg, resolved.name)
    t3 = time.perf_counter()
    metrics = {
        "load_seconds": round(t1 - t0, 3),
        "calibrate_seconds": round(t2 - t1, 3),
        "plan_seconds": round(t3 - t2, 3),
        "calibration_prompts": len(prompts),
        "calibration_steps": steps,
        "calibration_guidance": guidance,
        "quantized_layers": sum(lp.quantized for lp in plan.layers),
        "fp_layers": sum(not lp.quantized for lp in plan.layers),
    }
    bundle = export_bundle(pipe, plan, stats, ExportConfig(Path(config.out), config.overwrite), metrics)
    return bundle
