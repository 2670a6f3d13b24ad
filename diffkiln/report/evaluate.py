"""The ``report`` verb: generate evaluation images for a TARGET, judge them, write JSON and HTML.

Prompt sets, when no prompts file is given: ``eval_size`` prompts each of single objects in seen
compositions, single objects in held-out compositions, and two-object scenes (seen
compositions). With a prompts file, each prompt the judge can parse is counted in the set its
composition belongs to; the others are generated and shown but not scored. A model without a
judge (a user's own) is evaluated on the calibration prompts its bundle recorded, or on a prompts
file; never on prompts of another domain. The report says which (``settings.prompts_source``).
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from diffkiln.core.atomic import check_results_folder
from diffkiln.core.errors import InvalidInputError
from diffkiln.core.plan import calibration_record
from diffkiln.core.toolchain import toolchain_versions
from diffkiln.generation import GenerateConfig, generate, load_pipeline
from diffkiln.report.judging import JudgedImage, judge_all, prompt_list, prompt_source, quality
from diffkiln.report.sparse import attention_speed, mask_pictures
from diffkiln.zoo.registry import JudgeKind, ResolvedTarget, resolve_target

__all__ = [
    "JudgedImage",
    "Report",
    "ReportConfig",
    "build_report",
    "judge_all",
    "prompt_list",
    "quality",
    "report",
    "write_report",
]

REPORT_VERSION = 1


@dataclass(frozen=True)
class ReportConfig:
    """What to evaluate and how.

    Attributes:
        eval_size: prompts per built-in evaluation set (three sets), or the most of a bundle's
            recorded calibration prompts used for a model without a judge. Default 200.
        eval_prompts: a prompts file (one per line) used instead of the built-in sets. Default None.
        steps: denoising steps; None takes the model's default.
        guidance: guidance scale; None takes the model's default.
        seed: base seed; prompt i is generated with seed + i. Default 0.
        judge: the content judge; None picks the built-in model's own (none for a user's folder).
        batch_size: prompts per pipeline call. Default 50.
        device: torch device. Default "cpu".
        progress: show progress bars. Default True.
        baseline: for a bundle, the FP model to compare against; None uses the source recorded
            in the bundle's manifest.
        force_baseline: compare against ``baseline`` even when it is not the bundle's source
            model (another class or other weights). Default False: such a baseline is refused.
        bos_comparison: for a bundle with BOS-aware rows, also build the same plan without
            BOS-awareness in memory (from the cached calibration) and report both. Default True.
        call_kwargs: pipeline-call arguments for every call, as (name, value) pairs; they override
            the built-in model's and, for a bundle, those it was calibrated with. Default none.
        vae_tiling: decode in tiles, the bundle and its FP baseline alike
            (:attr:`diffkiln.generation.GenerateConfig.vae_tiling`). Default False.
    """

    eval_size: int = 200
    eval_prompts: Path | None = None
    steps: int | None = None
    guidance: float | None = None
    seed: int = 0
    judge: JudgeKind | None = None
    batch_size: int = 50
    device: str = "cpu"
    progress: bool = True
    baseline: str | None = None
    force_baseline: bool = False
    bos_comparison: bool = True
    call_kwargs: tuple[tuple[str, Any], ...] = ()
    vae_tiling: bool = False

    def __post_init__(self) -> None:
        if self.eval_size <= 0:
            raise InvalidInputError(f"eval_size must be a positive integer, got {self.eval_size}")
        # Validates steps, guidance, seed and batch size with the same rules as generate.
        self.generate_config()

    def generate_config(self) -> GenerateConfig:
        """The sampling settings as a GenerateConfig."""
        return GenerateConfig(self.steps, self.guidance, self.seed, self.batch_size, self.progress, self.call_kwargs,
                              label="evaluation", vae_tiling=self.vae_tiling)  # fmt: skip


@dataclass
class Report:
    """Everything report.json and report.html show."""

    data: dict[str, Any]
    images: list[JudgedImage] = field(default_factory=list)
    baseline_images: list[JudgedImage] = field(default_factory=list)
    audio: list[tuple[str, Any]] = field(default_factory=list)
    """(label, waveform) per generated audio sample."""
    baseline_audio: list[tuple[str, Any]] = field(default_factory=list)
    sample_rate: int = 44100
    inputs: list[tuple[str, Any]] = field(default_factory=list)
    """(label, picture) of what each sample started from (image-to-image, inpainting, video-to-video)."""


def _calibration_notes(pipe: Any) -> dict[str, Any]:
    """The calibration settings a bundle's plan recorded, or those an ONNX export copied from its
    bundle (empty for anything else)."""
    manifest = getattr(pipe, "diffkiln_manifest", None) or {}
    if "plan" in manifest:
        return calibration_record(manifest)
    copied = manifest.get("bundle", {}).get("calibration")  # an ONNX export: its bundle's record
    return copied if isinstance(copied, dict) else {}


def _bundle_call_kwargs(pipe: Any) -> tuple[tuple[str, Any], ...]:
    """The call arguments a bundle was calibrated with (a user folder's size, frames, ...)."""
    recorded = _calibration_notes(pipe).get("call_kwargs", {})
    return tuple(recorded.items()) if isinstance(recorded, dict) else ()


def _recorded_prompts(pipe: Any) -> list[str] | None:
    """The calibration prompts a bundle's plan recorded, or None."""
    recorded = _calibration_notes(pipe).get("prompts")
    if not isinstance(recorded, list):
        return None
    return [p for p in recorded if isinstance(p, str) and p.strip()] or None


def build_report(target: str | os.PathLike[str] | ResolvedTarget, config: ReportConfig) -> Report:
    """Generate the evaluation images for ``target`` and measure them.

    Args:
        target: a built-in name, a diffusers folder, or a resolved target.
        config: evaluation settings.

    Raises:
        ModelNotFoundError: the target does not resolve.
        InvalidInputError: the prompts file is missing or empty, or no prompts are known for the
            target (:func:`~diffkiln.report.judging.prompt_source`).
    """
    resolved = target if isinstance(target, ResolvedTarget) else resolve_target(target)
    # A bundle of a built-in model built under another source id is judged as its --baseline is.
    builtin = resolved.builtin or (resolve_target(config.baseline).builtin if config.baseline else None)
    judge_kind = config.judge or (builtin.judge if builtin else JudgeKind.NONE)
    t0 = time.perf_counter()
    pipe = load_pipeline(resolved, config.device)
    prompts, source = prompt_source(config, judge_kind, _recorded_prompts(pipe), resolved.name)
    config = replace(config, call_kwargs=(*_bundle_call_kwargs(pipe), *config.call_kwargs))
    cache_run = getattr(pipe, "diffkiln_cache", None)
    before = (cache_run.evaluated, cache_run.uncached) if cache_run is not None else (0, 0)
    sparse_run = getattr(pipe, "diffkiln_sparse", None)
    sparse_before = (sparse_run.kept, sparse_run.dense) if sparse_run is not None else (0.0, 0.0)
    label = "evaluation: bundle" if resolved.bundle else "evaluation"
    result = generate(pipe, prompts, replace(config.generate_config(), label=label), resolved, measure=resolved.bundle,
                      samples=None if config.eval_prompts else config.eval_size)  # fmt: skip
    counts = (cache_run.evaluated - before[0], cache_run.uncached - before[1]) if cache_run is not None else None
    attention = _attention_section(sparse_run, sparse_before) if sparse_run is not None else None
    judged = judge_all(result, judge_kind)
    data: dict[str, Any] = {
        "report_version": REPORT_VERSION,
        "target": resolved.name,
        "target_path": str(resolved.path),
        "pipeline_class": type(pipe).__name__,
        "device": str(getattr(pipe, "device", config.device)),
        "settings": {
            "steps": result.steps,
            "guidance": result.guidance,
            "seed": result.seed,
            "scheduler": result.scheduler,
            "eval_size": None if config.eval_prompts else config.eval_size,
            "eval_prompts": str(config.eval_prompts) if config.eval_prompts else None,
            "prompts_source": source,
            "judge": judge_kind.value,
            "device": config.device,
        },
        "timing": {
            "generate_seconds": round(result.seconds, 3),
            "seconds_per_sample": round(result.seconds / max(len(result.prompts), 1), 4),
        },
        "toolchain": toolchain_versions(),
    }
    if judge_kind.scores:
        data["quality"] = quality(judged)
    if attention is not None:
        data["attention"] = attention
    rep = Report(data=data, images=judged, sample_rate=result.sample_rate or 44100,
                 inputs=list(zip(result.prompts, result.inputs, strict=False)))  # fmt: skip
    rep.audio = list(zip(result.prompts, result.audios or [], strict=False))
    if resolved.bundle:
        base_result, rep.baseline_images, data["per_layer_sqnr_db"] = _compare_with_baseline(
            pipe, resolved, result, config, judge_kind, data, counts
        )
        rep.baseline_audio = list(zip(base_result.prompts, base_result.audios or [], strict=False))
    data["timing"]["total_seconds"] = round(time.perf_counter() - t0, 3)
    return rep


def _attention_section(run: Any, before: tuple[float, float]) -> dict[str, Any]:
    """The sparse-attention masks as they ran for this report: density measured by the kernels over
    the masked calls, against the plan's, with the families chosen."""
    kept, dense = run.kept - before[0], run.dense - before[1]
    plan = run.plan
    return {
        "density": round(kept / dense, 4) if dense else None,
        "planned_density": round(plan.density, 4),
        "masked_layers": len(plan.layers),
        "block": plan.block,
        "families": sorted({f for lm in plan.layers for group in lm.families for f in group}),
        "simulated": False,
        "speed_alone": attention_speed(run),
        "pictures": mask_pictures(plan),
    }


def _compare_with_baseline(
    pipe: Any,
    resolved: ResolvedTarget,
    result: Any,
    config: ReportConfig,
    judge_kind: JudgeKind,
    data: dict[str, Any],
    cache_counts: tuple[int, int] | None = None,
) -> tuple[Any, list[JudgedImage], dict[str, float]]:
    """Run the FP baseline on the same inputs and seeds; fill baseline, fidelity, size, latency, memory
    (and, for a bundle with a cache schedule whose hooks counted ``cache_counts``, the cache section).

    Returns:
        (the baseline's generation, its judged images, the per-layer SQNR chart's values).
    """
    from diffkiln.core.errors import ModelNotFoundError
    from diffkiln.report.compare import check_same_model, fidelity, onnx_denoiser_sizes, per_layer_sqnr
    from diffkiln.runtime.inspect import denoiser_sizes

    manifest = pipe.diffkiln_manifest
    origin = manifest["bundle"]["source"] if resolved.onnx else manifest["source"]
    source = config.baseline or origin.get("id", "")
    try:
        base_target = resolve_target(source)
    except ModelNotFoundError as exc:
        raise ModelNotFoundError(f"cannot load the FP baseline {source!r} ({exc}); pass --baseline MODEL") from None
    base = load_pipeline(base_target, config.device)
    if not config.force_baseline:
        check_same_model(base, manifest["pipeline"], origin.get("weight_hash"), source)
    gen_cfg = replace(config.generate_config(), steps=result.steps, guidance=result.guidance,
                      denoiser=manifest["pipeline"]["denoiser"], label="evaluation: FP baseline")  # fmt: skip
    samples = len(result.prompts)
    base_result = generate(base, result.prompts, gen_cfg, base_target, measure=True, samples=samples)
    base_judged = judge_all(base_result, judge_kind)
    if resolved.onnx:
        stored, fp16 = onnx_denoiser_sizes(resolved.path, manifest, base)
    else:
        stored, fp16 = denoiser_sizes(resolved.path, manifest)
    data["baseline"] = {
        "target": base_target.name,
        "latency": {"ms_per_step": base_result.extras["denoiser_ms_per_step"]},
        "memory": {"peak_bytes": base_result.extras["peak_bytes"]},
    }
    if judge_kind.scores:
        data["baseline"]["quality"] = quality(base_judged)
    data["fidelity"] = fidelity(base_result, result)
    data["size"] = {
        "denoiser_bytes": stored,
        "denoiser_fp16_bytes": fp16,
        "denoiser_ratio_vs_fp16": stored / fp16 if fp16 else None,
        # the files the manifest lists, as `diffkiln inspect` counts them (an ONNX export lists names only)
        "bundle_bytes": sum((resolved.path / f).stat().st_size for f in manifest["files"])
        if resolved.onnx
        else sum(info["bytes"] for info in manifest["files"].values()),
    }
    data["latency"] = {"ms_per_step": result.extras["denoiser_ms_per_step"]}
    data["memory"] = {
        "peak_bytes": result.extras["peak_bytes"],
        "note": "process peak RSS on CPU (both pipelines resident), allocator peak on CUDA",
    }
    if resolved.onnx:  # onnxruntime runs the graphs: no torch layers to hook, no BOS or cache variants
        runtime = f"onnxruntime, opset {manifest['opset']}, {manifest['compute']} compute"
        data["plan"] = {"recipe": manifest["bundle"]["recipe"], "simulated": False, "runtime": runtime}
        return base_result, base_judged, {}
    data["plan"] = {
        "avg_weight_bits": manifest["quant"]["avg_weight_bits"],
        "avg_act_bits": manifest["quant"]["avg_act_bits"],
        "recipe": manifest["quant"]["recipe"],
        "simulated": manifest["quant"].get("simulated", False),
        # Wan 2.2's transformer_2: quantized beside the denoiser, counted in the sizes above.
        "experts": {
            name: {"avg_weight_bits": e["quant"]["avg_weight_bits"], "avg_act_bits": e["quant"]["avg_act_bits"]}
            for name, e in (manifest.get("experts") or {}).items()
        },
    }
    data["bos"] = manifest["bos"]
    if cache_counts is not None:
        from diffkiln.report.cache import cache_section

        def judged_quality(generation: Any) -> dict[str, Any] | None:
            return quality(judge_all(generation, judge_kind)) if judge_kind.scores else None

        data["cache"] = cache_section(pipe, resolved, result, base_result, gen_cfg, cache_counts, judged_quality)
        data["cache"]["fidelity_vs_fp"] = data["fidelity"]
        data["cache"]["quality_cached"] = data.get("quality")
    call = _one_call(base, result, gen_cfg, base_target)
    layer_sqnr = per_layer_sqnr(base, pipe, call, manifest["pipeline"]["denoiser"])
    if manifest.get("experts"):  # each at its first call: it runs at only some of the steps
        data["experts_per_layer_sqnr_db"] = {name: per_layer_sqnr(base, pipe, call, name, at_call=0)
                                             for name in sorted(manifest["experts"])}  # fmt: skip
    if config.bos_comparison and manifest["bos"].get("positions"):
        data["bos_comparison"] = _bos_comparison(base, base_target, manifest, base_result, gen_cfg, judge_kind, data)
    return base_result, base_judged, layer_sqnr


def _one_call(pipe: Any, result: Any, config: GenerateConfig, target: ResolvedTarget) -> dict[str, Any]:
    """The full arguments of one FP call on the first evaluation sample (latent output)."""
    import torch

    from diffkiln.calibrate.sources import batch_kwargs, source_for
    from diffkiln.core.pipelines import accepted_call_kwargs

    given = {**target.call_kwargs, **dict(config.call_kwargs)}
    source = source_for(pipe, result.prompts, 1, config.seed, given)
    defaults = {"num_inference_steps": result.steps, "guidance_scale": result.guidance, "output_type": "latent"}
    # One sample as a one-sample call takes it: its image or clip, and one generator, not lists of
    # one (a pipeline may refuse the first; VideoToVideoSD encodes one frame per listed generator).
    return {
        **batch_kwargs(pipe, [source.sample(0)], own_media=True),
        **accepted_call_kwargs(pipe, defaults),
        **accepted_call_kwargs(pipe, given, strict=True),
        "generator": torch.Generator().manual_seed(config.seed),
    }


def _bos_comparison(
    base: Any,
    base_target: ResolvedTarget,
    manifest: dict[str, Any],
    base_result: Any,
    gen_cfg: GenerateConfig,
    judge_kind: JudgeKind,
    data: dict[str, Any],
) -> dict[str, Any]:
    """The bundle (BOS-aware) against the same plan without BOS-awareness, on the same prompts.

    The variants are rebuilt in memory from the bundle's recorded settings
    (:func:`diffkiln.api.variants.w8a8_variants`); this function only measures them.
    When the bundle uses SmoothQuant, both are also built with smoothing off (``smoothing_off``):
    smoothing can move a BOS outlier that sits in a few channels into the weights, so with it on the
    two may tie; MixDQ compares them without smoothing.
    """
    from diffkiln.api.variants import w8a8_variants
    from diffkiln.optimizer import SmoothMode
    from diffkiln.report.compare import fidelity

    try:
        variants = w8a8_variants(base, manifest, base_target.name)
    except ValueError as exc:
        return {"skipped": str(exc)}
    recorded = variants.recorded

    def summary(fid: dict[str, Any], judged: dict[str, Any] | None) -> dict[str, Any]:
        keys = ("latent_sqnr_db", "latent_sqnr_db_median_prompt", "prompts_below_10db", "image_psnr_db")
        out = {k: fid.get(k) for k in keys}
        if judged:
            for k in ("content_accuracy", "content_accuracy_heldout", "content_accuracy_pairs"):
                out[k] = judged.get(k)
        return out

    def variant(**changes: Any) -> dict[str, Any]:
        result = generate(variants.build(**changes), base_result.prompts, gen_cfg, base_target, measure=True)
        judged = quality(judge_all(result, judge_kind)) if judge_kind.scores else None
        return summary(fidelity(base_result, result), judged)

    comparison: dict[str, Any] = {
        "bos_aware": summary(data["fidelity"], data.get("quality")),
        "no_bos": variant(bos_aware=False),
    }
    if recorded.smooth is not SmoothMode.OFF:
        comparison["smoothing_off"] = {
            "bos_aware": variant(bos_aware=True, smooth=SmoothMode.OFF),
            "no_bos": variant(bos_aware=False, smooth=SmoothMode.OFF),
        }
    return comparison


def write_report(rep: Report, out_dir: str | os.PathLike[str]) -> tuple[Path, Path]:
    """Write ``report.json`` and a self-contained ``report.html`` into ``out_dir``.

    Returns:
        The two paths.
    """
    from diffkiln.report.html import render_html

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    json_path, html_path = out / "report.json", out / "report.html"
    rep.data = _finite(rep.data)
    # Both rendered before either is written, each written whole (temp file, then renamed): a
    # failure leaves the folder as it was, never a report.json without its page.
    texts = {json_path: json.dumps(rep.data, indent=2, allow_nan=False, default=_json_default) + "\n",
             html_path: render_html(rep)}  # fmt: skip
    for path, text in texts.items():
        tmp = path.with_name(f".{path.name}.partial-{os.getpid()}")
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(path)
    return json_path, html_path


def _finite(obj: Any) -> Any:
    """``obj`` with infinite or NaN floats (an exact layer's SQNR, an unreadable memory figure) as
    None: JSON has no such numbers."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def _json_default(obj: Any) -> Any:
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "__dataclass_fields__"):
        return asdict(obj)
    raise TypeError(f"cannot serialise {type(obj).__name__}")


def report(target: str | os.PathLike[str], config: ReportConfig, out_dir: str | os.PathLike[str]) -> tuple[Path, Path]:
    """Build the report for ``target`` and write it to ``out_dir``; returns (json, html) paths.

    Raises:
        InvalidInputError: ``out_dir`` is a file or cannot be written (checked before the work).
    """
    check_results_folder(Path(out_dir))
    return write_report(build_report(target, config), out_dir)
