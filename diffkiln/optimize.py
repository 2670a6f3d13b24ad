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
from typing import Any

from diffkiln.calibrate import CalibrationConfig, calibrate
from diffkiln.calibrate.prompts import default_calibration_prompts
from diffkiln.core.errors import InvalidInputError
from diffkiln.export import ExportConfig, FloatStorage, export_bundle
from diffkiln.generation import load_pipeline, read_prompts
from diffkiln.optimizer import ActMode, QuantizeConfig, Recipe, SmoothMode, make_plan
from diffkiln.optimizer.allocation import InfeasibleBudgetError
from diffkiln.optimizer.mixed import MixedConfig, WeightBudget, make_mixed_plan, mixed_sensitivity
from diffkiln.optimizer.sensitivity import SensitivityConfig, SensitivityTable
from diffkiln.zoo.registry import default_cache_dir, resolve_target

__all__ = ["OptimizeConfig", "default_cache_dir", "optimize", "sensitivity"]


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
        weight_bits: W8A8: the weight grid, 8 or 7 (see :class:`diffkiln.optimizer.QuantizeConfig`).
            Mixed: the average weight bits over the denoiser's Linear/Conv2d parameters (FP
            layers count 16), e.g. 4.0. Default 8.
        act_bits: W8A8: the static activation grid, 8 or 7 (None: 8). Mixed: the average
            activation bits, or None for 8-bit activations on every quantized layer. Default None.
        weight_candidates: mixed: the weight bit-widths to choose from. Default (2, 4, 8, 16).
        act_candidates: mixed: the activation bit-widths to choose from. Default (8, 16).
        content_layers: mixed: globs of layers forced into the content group. Default none.
        quality_layers: mixed: globs of layers forced into the quality group. Default none.
        sensitivity_prompts: mixed: calibration prompts the sensitivity trials use. Default 4.
        workers: mixed: processes for the sensitivity analysis. Default 1.
        latency_budget_ms: mixed: bound on the summed latency of the searched layers, measured
            per layer on this machine's CPU. Default None (no bound).
        weight_group_size: mixed: two-level groups of this many inputs for 4-, 3- and 2-bit weights
            (an integer multiplier per group on the per-channel scale). Default None (per channel).
        weight_budget: mixed: what ``weight_bits`` averages, stored bits per weight (codes, scales,
            group multipliers) or code bits only. Default STORED.
        smooth: which Linear layers get SmoothQuant smoothing. Default AUTO.
        smooth_alpha: smoothing strength in (0, 1). Default 0.5.
        timestep_aware: one static activation range per sampler step. Default False.
        requantize_conv_outputs: w8a8, static only: round each integer convolution's output onto
            a calibrated int8 grid, so that onnxruntime runs the convolutions as int8 QLinearConv
            (see ``QuantizeConfig.requantize_conv_outputs``). Default False.
        float_storage: how the bundle stores float tensors: LOSSLESS (exact), or FLOAT16 (weight
            scales, biases, BOS rows and FP tensors in float16, as an FP16 checkpoint stores them).
            None: the recipe's default, LOSSLESS for w8a8 and FLOAT16 for mixed. Default None.
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
    weight_bits: float = 8
    act_bits: float | None = None
    weight_candidates: tuple[int, ...] = (2, 4, 8, 16)
    act_candidates: tuple[int, ...] = (8, 16)
    content_layers: tuple[str, ...] = ()
    quality_layers: tuple[str, ...] = ()
    sensitivity_prompts: int = 4
    workers: int = 1
    latency_budget_ms: float | None = None
    weight_group_size: int | None = None
    weight_budget: WeightBudget = WeightBudget.STORED
    smooth: SmoothMode = SmoothMode.AUTO
    smooth_alpha: float = 0.5
    timestep_aware: bool = False
    requantize_conv_outputs: bool = False
    float_storage: FloatStorage | None = None
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
        if self.requantize_conv_outputs and (self.act_mode is not ActMode.STATIC or self.recipe is not Recipe.W8A8):
            raise InvalidInputError(
                "--requantize-conv-outputs needs --recipe w8a8 with static activations; drop it or those options"
            )
        if self.recipe is Recipe.MIXED:
            try:
                self.mixed_config()
                self.sensitivity_config()
            except ValueError as exc:
                raise InvalidInputError(f"--recipe mixed: {exc}") from None
            if self.act_mode is not ActMode.STATIC:
                raise InvalidInputError("--recipe mixed uses static activations; drop --act-mode dynamic")
            return
        act_bits = 8 if self.act_bits is None else self.act_bits
        if act_bits != 8 and self.act_mode is not ActMode.STATIC:
            raise InvalidInputError("7-bit activations need static activations; drop --act-mode dynamic")
        for name, value in (("weight_bits", self.weight_bits), ("act_bits", act_bits)):
            if value not in (7, 8):
                raise InvalidInputError(
                    f"{name} must be 7 or 8 for the w8a8 recipe, got {value}; "
                    "for averages such as 4.0 use --recipe mixed"
                )

    def resolved_float_storage(self) -> FloatStorage:
        """The float storage: as given, or the recipe's default (mixed bundles are compared with
        FP16, so they store float tensors as an FP16 checkpoint would)."""
        if self.float_storage is not None:
            return self.float_storage
        return FloatStorage.FLOAT16 if self.recipe is Recipe.MIXED else FloatStorage.LOSSLESS

    def mixed_config(self) -> MixedConfig:
        """The mixed-precision search settings these options give."""
        return MixedConfig(
            weight_bits=float(self.weight_bits),
            act_bits=None if self.act_bits is None else float(self.act_bits),
            weight_candidates=self.weight_candidates,
            act_candidates=self.act_candidates,
            content=self.content_layers,
            quality=self.quality_layers,
            latency_budget_ms=self.latency_budget_ms,
            group_size=self.weight_group_size,
            budget=self.weight_budget,
        )

    def sensitivity_config(self) -> SensitivityConfig:
        """The sensitivity-analysis settings these options give."""
        return SensitivityConfig(
            prompts=self.sensitivity_prompts,
            workers=self.workers,
            cache_dir=self.cache_dir or default_cache_dir(),
            progress=self.progress,
            group_size=self.weight_group_size,
        )


@dataclass(frozen=True)
class _Prepared:
    """A loaded, calibrated model: what every build verb starts from."""

    resolved: Any
    pipe: Any
    stats: Any
    qconfig: QuantizeConfig
    metrics: dict[str, Any]

    @property
    def worker_target(self) -> str:
        """What sensitivity worker processes load: the built-in name, or the folder."""
        return self.resolved.name if self.resolved.builtin is not None else str(self.resolved.path)

    def search_inputs(self, config: OptimizeConfig) -> dict[str, Any]:
        """The keyword arguments :func:`make_mixed_plan` and :func:`mixed_sensitivity` share."""
        return {
            "pipe": self.pipe,
            "stats": self.stats,
            "qconfig": self.qconfig,
            "sens_config": config.sensitivity_config(),
            "source_id": self.resolved.name,
            "target": self.worker_target,
        }


def _prepare(target: str | os.PathLike[str], config: OptimizeConfig) -> _Prepared:
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
    mixed = config.recipe is Recipe.MIXED
    qcfg = QuantizeConfig(
        act_mode=config.act_mode,
        include=config.include,
        exclude=config.exclude,
        bos_aware=config.bos_aware,
        weight_bits=8 if mixed else int(config.weight_bits),
        act_bits=8 if mixed or config.act_bits is None else int(config.act_bits),
        smooth=config.smooth,
        smooth_alpha=config.smooth_alpha,
        timestep_aware=config.timestep_aware,
        requantize_conv_outputs=config.requantize_conv_outputs,
        scale_dtype="float16" if config.resolved_float_storage() is FloatStorage.FLOAT16 else "auto",
    )
    metrics = {
        "load_seconds": round(t1 - t0, 3),
        "calibrate_seconds": round(t2 - t1, 3),
        "calibration_prompts": len(prompts),
        "calibration_steps": steps,
        "calibration_guidance": guidance,
    }
    return _Prepared(resolved, pipe, stats, qcfg, metrics)


def optimize(target: str | os.PathLike[str], config: OptimizeConfig) -> Path:
    """Build a bundle for ``target`` (a built-in name or a diffusers folder).

    Returns:
        The bundle directory.

    Raises:
        ModelNotFoundError: the target does not resolve.
        InvalidInputError: bad settings or prompts file, or an infeasible mixed budget (the
            message names the smallest feasible one).
        BundleError: the output exists and ``overwrite`` is False.
    """
    from diffkiln.core.errors import BundleError

    if Path(config.out).exists() and not config.overwrite:
        raise BundleError(f"{config.out} already exists; pass --overwrite to replace it")
    prep = _prepare(target, config)
    mixed = config.recipe is Recipe.MIXED
    t0 = time.perf_counter()
    if mixed:
        try:
            result = make_mixed_plan(config=config.mixed_config(), **prep.search_inputs(config))
        except InfeasibleBudgetError as exc:
            raise InvalidInputError(str(exc)) from None
        plan = result.plan
    else:
        plan = make_plan(prep.pipe, prep.stats, prep.qconfig, prep.resolved.name)
    metrics = {
        **prep.metrics,
        # mixed: sensitivity analysis + ILP + measuring the candidate plans
        ("search_seconds" if mixed else "plan_seconds"): round(time.perf_counter() - t0, 3),
        "quantized_layers": sum(lp.quantized for lp in plan.layers),
        "fp_layers": sum(not lp.quantized for lp in plan.layers),
    }
    export_cfg = ExportConfig(Path(config.out), config.overwrite, config.resolved_float_storage())
    return export_bundle(prep.pipe, plan, prep.stats, export_cfg, metrics)


def sensitivity(target: str | os.PathLike[str], config: OptimizeConfig) -> tuple[SensitivityTable, Path, Path]:
    """Run (or read back from the cache) the mixed recipe's sensitivity analysis alone.

    Writes ``config.out/sensitivity.json`` (the table) and ``config.out/sensitivity.html`` (a
    chart and the table).

    Returns:
        (the table, the JSON path, the HTML path).
    """
    from diffkiln.report.sensitivity_html import write_sensitivity

    prep = _prepare(target, config)
    t0 = time.perf_counter()
    _, table, _ = mixed_sensitivity(config=config.mixed_config(), **prep.search_inputs(config))
    seconds = time.perf_counter() - t0
    json_path, html_path = write_sensitivity(table, Path(config.out), prep.resolved.name, seconds)
    return table, json_path, html_path
