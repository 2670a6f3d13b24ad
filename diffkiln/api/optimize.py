"""``optimize``: a TARGET (built-in name or diffusers folder) to a bundle in one call, and the
pieces it strings together: load -> calibrate -> plan (any recipe) -> export.

Each stage is also a verb of its own (:func:`diffkiln.calibrate.calibrate`,
:func:`diffkiln.optimizer.make_plan`, :func:`diffkiln.export.export_bundle`,
:func:`diffkiln.runtime.load`); this module only strings them together with the settings
``diffkiln optimize`` takes.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from diffkiln.calibrate import CalibrationConfig, CalibrationStats, InputFiles, calibrate
from diffkiln.calibrate.prompts import generic_prompts
from diffkiln.core.atomic import check_output_folder
from diffkiln.core.distributed import barrier, init_distributed, rank_world
from diffkiln.core.errors import InvalidInputError
from diffkiln.core.plan import Plan
from diffkiln.export import ExportConfig, FloatStorage, export_bundle
from diffkiln.generation import load_pipeline, read_prompts
from diffkiln.optimizer import (
    CacheConfig,
    MixedConfig,
    SearchContext,
    SensitivityTable,
    SparseConfig,
    W8A8Config,
    for_target,
    make_plan,
    mixed_sensitivity,
    recipe_float_storage,
    recipe_name,
    search_cache,
    search_sparse,
)
from diffkiln.zoo.registry import ResolvedTarget, default_cache_dir, resolve_target

__all__ = ["OptimizeConfig", "Prepared", "optimize", "prepare", "sensitivity"]


@dataclass(frozen=True)
class OptimizeConfig:
    """Everything ``diffkiln optimize`` takes besides the model.

    Attributes:
        out: the bundle directory to write.
        recipe: the recipe's config; its type selects the recipe (:class:`W8A8Config`,
            :class:`MixedConfig`, ...). Default W8A8.
        calib_prompts: a prompts file; None uses ``calib_size`` default prompts. Default None.
        calib_size: how many samples to calibrate on (default prompts, or images / seeds for
            pipelines without text). Default 32.
        calib_inputs: the user's own input images, masks, control images or clips to calibrate a
            pipeline that starts from an image or a clip on (image-to-image, inpainting,
            ControlNet, image- and video-to-video), taken in turn (:class:`InputFiles`); empty:
            seeded synthetic images and clips. Default empty.
        steps: sampler steps for calibration; None takes the model's default.
        guidance: guidance scale for calibration; None takes the model's default.
        call_kwargs: pipeline-call arguments for every call, as (name, value) pairs (height,
            width, num_frames, max_sequence_length, ...); they override a built-in model's own.
            Default none.
        denoiser: the pipeline component to quantize; None finds it, with the experts of its class
            that the sampler runs at other steps (Wan 2.2's ``transformer_2``), each quantized
            too; a named one is quantized alone. Default None.
        deploy_target: a runtime the plan must be executable on as a whole (``"mindiesd"``: Linear
            layers only, no BOS rows; :data:`diffkiln.optimizer.TARGETS`), so the bundle and its
            report are the deployed model. None: diffkiln's runtimes. Default None.
        cache: a cache-schedule search composed with the recipe (``--cache-budget`` with w8a8 or
            mixed); None: no cache, unless the recipe is :class:`CacheConfig` itself. Default None.
        sparse: a sparse-attention mask search composed with the recipe (``--attn-density`` with
            another recipe); None: dense attention, unless the recipe is :class:`SparseConfig`
            itself. Default None.
        float_storage: how the bundle stores float tensors; None: the recipe's default (lossless
            for w8a8, float16 for mixed). Default None.
        overwrite: replace an existing bundle. Default False.
        cache_dir: calibration and search cache; None uses :func:`default_cache_dir`.
        seed: base seed for calibration. Default 0.
        progress: show progress bars. Default True.
    """

    out: Path
    recipe: Any = field(default_factory=W8A8Config)
    calib_prompts: Path | None = None
    calib_size: int = 32
    calib_inputs: InputFiles = field(default_factory=InputFiles)
    steps: int | None = None
    guidance: float | None = None
    call_kwargs: tuple[tuple[str, Any], ...] = ()
    denoiser: str | None = None
    deploy_target: str | None = None
    cache: CacheConfig | None = None
    sparse: SparseConfig | None = None
    float_storage: FloatStorage | None = None
    overwrite: bool = False
    cache_dir: Path | None = None
    seed: int = 0
    progress: bool = True

    def __post_init__(self) -> None:
        recipe_name(self.recipe)  # an unregistered config type lists the valid ones
        self.resolved_recipe()  # an unknown target, or a setting it cannot run, fails here
        if self.calib_size <= 0:
            raise InvalidInputError(f"calib_size must be a positive integer, got {self.calib_size}")
        if self.steps is not None and self.steps <= 0:
            raise InvalidInputError(f"steps must be a positive integer, got {self.steps}")
        if self.guidance is not None and self.guidance < 0:
            raise InvalidInputError(f"guidance must be >= 0, got {self.guidance}")
        if self.cache is not None and isinstance(self.recipe, CacheConfig):
            raise InvalidInputError("the cache recipe searches its own schedule; drop the separate cache config")
        if self.sparse is not None and isinstance(self.recipe, SparseConfig):
            raise InvalidInputError("the sparse recipe searches its own masks; drop the separate sparse config")

    @property
    def wants_cache(self) -> bool:
        """True when the build searches a cache schedule (the cache recipe, or ``cache`` given)."""
        return self.cache is not None or isinstance(self.recipe, CacheConfig)

    @property
    def wants_sparse(self) -> bool:
        """True when the build searches sparse-attention masks (the sparse recipe, or ``sparse`` given)."""
        return self.sparse is not None or isinstance(self.recipe, SparseConfig)

    @property
    def sparse_config(self) -> SparseConfig | None:
        """The mask search's config: the sparse recipe, or ``sparse``; None without one."""
        return self.recipe if isinstance(self.recipe, SparseConfig) else self.sparse

    def resolved_recipe(self) -> Any:
        """The recipe config with :attr:`deploy_target`'s settings applied."""
        return for_target(self.recipe, self.deploy_target)

    def resolved_float_storage(self) -> FloatStorage:
        """The float storage: as given, or the recipe's default."""
        return self.float_storage or FloatStorage(recipe_float_storage(self.recipe))


@dataclass(frozen=True)
class Prepared:
    """A loaded, calibrated model: what every build verb starts from.

    Attributes:
        resolved: where the model came from.
        pipe: the FP pipeline.
        stats: its calibration statistics.
        metrics: load and calibration timings and settings.
        calibration: the calibration's settings (an expert is calibrated with the same ones).
    """

    resolved: ResolvedTarget
    pipe: Any
    stats: CalibrationStats
    metrics: dict[str, Any]
    calibration: CalibrationConfig | None = None

    def context(self, config: OptimizeConfig) -> SearchContext:
        """The search context of this model: its id, the cache, and a reload for worker processes."""
        target = self.resolved.name if self.resolved.builtin is not None else str(self.resolved.path)
        return SearchContext(
            source_id=self.resolved.name,
            cache_dir=config.cache_dir or default_cache_dir(),
            progress=config.progress,
            reload=functools.partial(load_pipeline, target),
        )


def _call_kwargs(resolved: ResolvedTarget, given: tuple[tuple[str, Any], ...]) -> tuple[tuple[str, Any], ...]:
    merged: dict[str, Any] = {**resolved.call_kwargs, **dict(given)}
    return tuple(merged.items())


def prepare(target: str | os.PathLike[str], config: OptimizeConfig) -> Prepared:
    """Load ``target`` and calibrate it with ``config``'s settings (statistics come from the cache
    when the same weights, inputs and settings were calibrated before).

    Raises:
        ModelNotFoundError: the target does not resolve.
        InvalidInputError: bad prompts file or settings, or a call argument the pipeline does not take.
    """
    resolved = resolve_target(target)
    builtin = resolved.builtin
    if config.calib_prompts:
        prompts = read_prompts(config.calib_prompts)
    else:
        prompts = (builtin.calibration_prompts(config.calib_size) if builtin else None) or generic_prompts(
            config.calib_size
        )
    steps = config.steps or (builtin.default_steps if builtin else 20)
    guidance = config.guidance if config.guidance is not None else (builtin.default_guidance if builtin else 5.0)
    t0 = time.perf_counter()
    pipe = load_pipeline(resolved)
    cal_cfg = CalibrationConfig(
        tuple(prompts),
        samples=len(prompts),
        steps=steps,
        guidance=guidance,
        seed=config.seed,
        cache_dir=config.cache_dir or default_cache_dir(),
        progress=config.progress,
        call_kwargs=_call_kwargs(resolved, config.call_kwargs),
        denoiser=config.denoiser,
        cache_stats=config.wants_cache,
        attention_stats=config.wants_sparse,
        attention_block=config.sparse_config.block if config.sparse_config is not None else 64,
        inputs=config.calib_inputs,
    )
    t1 = time.perf_counter()
    stats = calibrate(pipe, cal_cfg)
    t2 = time.perf_counter()
    metrics = {
        "load_seconds": round(t1 - t0, 3),
        "calibrate_seconds": round(t2 - t1, 3),
        "calibration_samples": len(prompts),
        "calibration_steps": steps,
        "calibration_guidance": guidance,
        "denoiser": stats.denoiser,
    }
    return Prepared(resolved, pipe, stats, metrics, cal_cfg)


def optimize(target: str | os.PathLike[str], config: OptimizeConfig) -> Path:
    """Build a bundle for ``target`` (a built-in name or a diffusers folder).

    Returns:
        The bundle directory.

    Raises:
        ModelNotFoundError: the target does not resolve.
        InvalidInputError: bad settings or inputs, or an infeasible budget (the message names the
            smallest feasible one).
        BundleError: the output exists and ``overwrite`` is False, or it is not a folder that
            diffkiln wrote (``overwrite`` never replaces a user's own files).
    """
    check_output_folder(Path(config.out), config.overwrite)
    rank, world = _join_process_group()
    prep = prepare(target, config)  # under torchrun the ranks share the calibration's batches
    t0 = time.perf_counter()
    context = prep.context(config)
    schedule = None
    if config.cache is not None:
        # The schedule does not depend on the recipe's plan; searched first, masks (of the sparse
        # recipe or --attn-density) are validated under it (sparse_search).
        cache = for_target(config.cache, config.deploy_target)
        schedule = search_cache(prep.pipe, prep.stats, cache, context)
        context = dataclasses.replace(context, cache_schedule=schedule)
    plan = make_plan(prep.pipe, prep.stats, config.resolved_recipe(), context)
    if schedule is not None:
        plan = dataclasses.replace(plan, cache=schedule)
    if config.sparse is not None:
        masks = search_sparse(prep.pipe, prep.stats, config.sparse, config.progress, plan.cache)
        plan = dataclasses.replace(plan, sparse=masks)
    experts = _expert_plans(prep, plan, config, context)
    metrics = {
        **prep.metrics,
        "deploy_target": config.deploy_target,
        "plan_seconds": round(time.perf_counter() - t0, 3),
        "quantized_layers": sum(lp.quantized for lp in plan.layers),
        "fp_layers": sum(not lp.quantized for lp in plan.layers),
    }
    export_cfg = ExportConfig(Path(config.out), config.overwrite, config.resolved_float_storage(), config.progress)
    if world > 1:
        metrics["ranks"] = world
    if experts:
        metrics["expert_quantized_layers"] = {e.denoiser: sum(lp.quantized for lp in e.layers) for e, _ in experts}
    out = export_bundle(prep.pipe, plan, prep.stats, export_cfg, metrics, experts) if rank == 0 else Path(config.out)
    barrier()  # the other ranks return once rank 0 has written the bundle
    return out


def _expert_plans(
    prep: Prepared, plan: Plan, config: OptimizeConfig, context: SearchContext
) -> list[tuple[Plan, CalibrationStats]]:
    """A plan for each expert of the denoiser's class the sampler also runs (Wan 2.2's
    ``transformer_2``), each from statistics of its own with the same settings: an expert sees
    other noise levels, so its ranges and sensitivities are its own. The denoiser's calibration run
    recorded them and cached each as its own (:func:`diffkiln.calibrate.calibrate`), so this reads
    them back. (Calibration refuses a cache schedule or sparse masks for a denoiser with experts:
    it runs at only some of the steps.)"""
    if not prep.stats.experts or prep.calibration is None:
        return []
    out = []
    for name in prep.stats.experts:
        stats = calibrate(prep.pipe, dataclasses.replace(prep.calibration, denoiser=name))
        evidence = f"an expert of {plan.denoiser}'s class that the sampler runs at other steps (statistics of its own)"
        stats = dataclasses.replace(stats, settings={**stats.settings, "denoiser_evidence": evidence})
        expert = make_plan(prep.pipe, stats, config.resolved_recipe(), context)
        out.append((expert, stats))
    return out


def _join_process_group() -> tuple[int, int]:
    """Under torchrun (``WORLD_SIZE`` > 1 in the environment): join the process group (gloo: the
    search runs on CPU) and return ``(rank, world)``; else ``(0, 1)``."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return init_distributed(torch.device("cpu"))
    return rank_world()


def sensitivity(target: str | os.PathLike[str], config: OptimizeConfig) -> tuple[SensitivityTable, float, str]:
    """Run (or read back from the cache) the mixed recipe's sensitivity analysis alone.

    Args:
        target: a built-in name or a diffusers folder.
        config: the settings; ``recipe`` must be a :class:`MixedConfig`.

    Returns:
        (the table, the seconds the analysis took, the model's name).

    Raises:
        InvalidInputError: ``config.recipe`` is not a MixedConfig.
    """
    if not isinstance(config.recipe, MixedConfig):
        raise InvalidInputError("the sensitivity analysis belongs to the mixed recipe; pass a MixedConfig")
    _join_process_group()
    prep = prepare(target, config)
    t0 = time.perf_counter()
    _, table, _ = mixed_sensitivity(prep.pipe, prep.stats, config.resolved_recipe(), prep.context(config))
    return table, time.perf_counter() - t0, prep.resolved.name
