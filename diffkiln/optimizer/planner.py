"""The ``plan`` verb: turn calibration statistics into a Plan for a recipe (W8A8 today).

Which layers stay in floating point is decided from the model's structure, never from layer
names: the denoiser's first and last Linear/Conv (the latent input and output projections), and
layers inside timestep/text-conditioning embedding modules (small, and their error reaches every
token). Adaptive-norm modulation layers are quantized: in DiTs they hold a large share of the
weights. ``include``/``exclude`` globs override these defaults.
"""

from __future__ import annotations

import fnmatch
from dataclasses import asdict, dataclass, fields
from enum import Enum
from typing import Any

import torch
from torch import nn

from diffkiln.calibrate.stats import CalibrationStats, LayerStats
from diffkiln.core.layers import find_quantizable_layers
from diffkiln.core.pipelines import find_denoiser
from diffkiln.core.plan import ActMode, ActSpec, LayerPlan, Plan, WeightSpec
from diffkiln.core.quantizers import ClipMethod, choose_act_params, float16_scales_exact
from diffkiln.core.smoothing import channel_outlier_ratio, smoothing_factors

__all__ = [
    "QuantizeConfig",
    "Recipe",
    "SmoothMode",
    "fp_default_reasons",
    "make_plan",
    "quantize_config_from_dict",
    "quantize_config_to_dict",
]


class Recipe(str, Enum):
    """Compression recipes."""

    W8A8 = "w8a8"
    MIXED = "mixed"  # per-layer bits by ILP from sensitivities (diffkiln.optimizer.mixed)


class SmoothMode(str, Enum):
    """Which Linear layers get SmoothQuant input-channel smoothing."""

    AUTO = "auto"  # layers with outlier input channels (see QuantizeConfig.smooth_min_outlier_ratio)
    ALL = "all"
    OFF = "off"


@dataclass(frozen=True)
class QuantizeConfig:
    """How to quantise.

    Attributes:
        recipe: the recipe. Default W8A8.
        act_mode: static per-tensor (from calibration) or dynamic per-token activations. Default static.
        clip: how static activation ranges are chosen. Default MSE.
        include: globs of layer names to quantise even if kept in FP by default. Default none.
        exclude: globs of layer names to keep in FP. Default none.
        bos_aware: precompute prompt-invariant text rows (BOS) in FP and leave them out of the
            activation range. Default True.
        weight_bits: 8, or 7 for x86 CPUs without VNNI: there oneDNN's int8 GEMM and convolution
            are exact only if weights (or activations) use 7 bits, and they run 2-4x faster than
            fp32 (BENCHMARKS.md). Default 8.
        act_bits: 8, or 7 (static mode only), the alternative way to the same fast path. Default 8.
        smooth: which Linear layers get SmoothQuant input-channel smoothing (see
            :mod:`diffkiln.core.smoothing`): AUTO, those with outlier channels; ALL; OFF.
            Default AUTO.
        smooth_alpha: smoothing strength in (0, 1). Default 0.5.
        smooth_min_outlier_ratio: in AUTO mode, smooth a layer when its largest input-channel
            maximum is at least this many times the median channel's. Default 8.0.
        timestep_aware: static mode only: one activation range per calibrated sampler step
            (as msModelSlim's timestep-aware W8A8), chosen from that step's samples; the runtime
            uses the range of the nearest calibrated timestep. Default False (one range).
        scale_dtype: "float32", "float16" or "auto" per-channel weight scales; the codes are
            rounded against the stored scale either way. "auto" takes float16 for a layer whose
            scales all lie in float16's normal range (half the scale bytes, nothing lost: see
            :func:`~diffkiln.core.quantizers.float16_scales_exact`) and float32 for the
            others. Default "auto".
        requantize_conv_outputs: static mode only: requantize each integer convolution's output
            onto a static int8 grid chosen from calibration (``LayerPlan.output``), as
            onnxruntime's ``quantize_static`` does. Runtimes whose integer convolutions produce
            int8 then run them in integer: onnxruntime's CPU provider fuses the QDQ into
            QLinearConv (3-4x faster than its float convolution; BENCHMARKS.md), and it has no
            fast integer convolution with a float output. Costs one more rounding per
            convolution. Default False (float outputs).
    """

    recipe: Recipe = Recipe.W8A8
    act_mode: ActMode = ActMode.STATIC
    clip: ClipMethod = ClipMethod.MSE
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    bos_aware: bool = True
    weight_bits: int = 8
    act_bits: int = 8
    smooth: SmoothMode = SmoothMode.AUTO
    smooth_alpha: float = 0.5
    smooth_min_outlier_ratio: float = 8.0
    timestep_aware: bool = False
    scale_dtype: str = "auto"
    requantize_conv_outputs: bool = False

    def __post_init__(self) -> None:
        for field_name, enum in (
            ("recipe", Recipe),
            ("act_mode", ActMode),
            ("clip", ClipMethod),
            ("smooth", SmoothMode),
        ):
            value = getattr(self, field_name)
            if not isinstance(value, enum):
                raise ValueError(f"{field_name} must be one of {[e.value for e in enum]}, got {value!r}")
        if self.weight_bits not in (7, 8):
            raise ValueError(f"weight_bits must be 7 or 8 for the W8A8 recipe, got {self.weight_bits}")
        if self.act_bits not in (7, 8):
            raise ValueError(f"act_bits must be 7 or 8 for the W8A8 recipe, got {self.act_bits}")
        if self.act_bits != 8 and self.act_mode is not ActMode.STATIC:
            raise ValueError("act_bits 7 needs static activations (act_mode static)")
        if not 0.0 < self.smooth_alpha < 1.0:
            raise ValueError(f"smooth_alpha must be in (0, 1), got {self.smooth_alpha}")
        if self.timestep_aware and self.act_mode is not ActMode.STATIC:
            raise ValueError("timestep_aware needs static activations (act_mode static)")
        if self.scale_dtype not in _SCALE_DTYPES:
            raise ValueError(f"scale_dtype must be one of {list(_SCALE_DTYPES)}, got {self.scale_dtype!r}")
        if self.requantize_conv_outputs and self.act_mode is not ActMode.STATIC:
            raise ValueError("requantize_conv_outputs needs static activations (act_mode static)")
        if self.smooth_min_outlier_ratio < 1.0:
            raise ValueError(f"smooth_min_outlier_ratio must be >= 1, got {self.smooth_min_outlier_ratio}")


_SCALE_DTYPES = ("auto", "float32", "float16")

_CONDITIONING_CLASS_HINTS = ("Timestep", "Embedding")


def fp_default_reasons(denoiser: nn.Module) -> dict[str, str]:
    """Layers kept in FP by default, with the structural reason for each."""
    layers = find_quantizable_layers(denoiser)
    modules = dict(denoiser.named_modules())
    names = list(layers)
    reasons: dict[str, str] = {}
    if names:
        reasons[names[0]] = "input projection (first layer)"
        reasons[names[-1]] = "output projection (last layer)"
    for name in names:
        parts = name.split(".")
        for i in range(1, len(parts)):
            cls = type(modules[".".join(parts[:i])]).__name__
            if any(h in cls for h in _CONDITIONING_CLASS_HINTS):
                reasons.setdefault(name, f"conditioning layer inside {cls}")
                break
    return reasons


def quantize_config_to_dict(config: QuantizeConfig) -> dict[str, Any]:
    """A JSON-ready dict of a QuantizeConfig (enums as their values), recorded in the plan's notes."""
    return {
        k: (v.value if isinstance(v, Enum) else list(v) if isinstance(v, tuple) else v)
        for k, v in asdict(config).items()
    }


def quantize_config_from_dict(d: dict[str, Any]) -> QuantizeConfig:
    """Rebuild a QuantizeConfig from :func:`quantize_config_to_dict` output.

    Raises:
        ValueError: an unknown field or value.
    """
    enums = {"recipe": Recipe, "act_mode": ActMode, "clip": ClipMethod, "smooth": SmoothMode}
    known = {f.name for f in fields(QuantizeConfig)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise ValueError(f"unknown QuantizeConfig field(s) {unknown}; valid: {sorted(known)}")
    kw: dict[str, Any] = {}
    for k, v in d.items():
        kw[k] = enums[k](v) if k in enums else tuple(v) if k in ("include", "exclude") else v
    return QuantizeConfig(**kw)


def _matches(name: str, globs: tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatchcase(name, g) for g in globs)


def _bos_summary(stats: CalibrationStats, positions: list[int]) -> dict[str, Any]:
    emb = stats.text_embeds.float()
    if emb.numel() == 0 or not positions:
        return {}
    absmax = emb.abs().amax(dim=(0, 2))
    others = [i for i in range(emb.shape[1]) if i not in positions]
    return {
        "bos_absmax": float(absmax[positions].max()),
        "other_tokens_absmax": float(absmax[others].max()) if others else None,
        "other_tokens_absmax_median": float(absmax[others].median()) if others else None,
    }


def _range_samples(
    st: LayerStats, step: int | None, factors: torch.Tensor | None, bos_rows: tuple[int, ...]
) -> torch.Tensor:
    """The calibration samples an activation range is chosen from: one step's or all, divided by
    the smoothing factors of their channels, without the BOS rows' samples (plus, for one step of
    an unsmoothed layer without BOS rows, that step's exact extremes)."""
    sel = slice(None) if step is None else slice(step, step + 1)
    samples = st.samples[sel].flatten()
    if factors is not None:
        samples = samples / factors[st.sample_channels[sel].flatten().long()]
    if bos_rows and st.sample_positions.numel():
        keep = ~torch.isin(st.sample_positions[sel].flatten(), torch.tensor(bos_rows, dtype=torch.int32))
        samples = samples[keep]
    if step is not None and factors is None and not bos_rows:
        # One step's 1,024 samples miss its tails (measured: per-step ranges from samples alone
        # cut shapes-unet's median-prompt SQNR from 25.5 to 19.9 dB); the recorded exact
        # extremes of the step let the range search see them.
        extremes = torch.stack([st.min[sel].min(), st.max[sel].max()]).to(samples.dtype)
        samples = torch.cat([samples, extremes])
    return samples


def _output_spec(name: str, st: LayerStats, clip: ClipMethod) -> ActSpec:
    """The static int8 grid a convolution's output is requantized onto, chosen (as the input's)
    from the output samples of all steps.

    Raises:
        ValueError: the statistics hold no output samples (calibrated by an older diffkiln).
    """
    if not st.has_output:
        raise ValueError(f"{name}: the calibration statistics hold no output samples; recalibrate")
    p = choose_act_params(st.out_samples.flatten(), clip, bits=8)
    return ActSpec(bits=8, mode=ActMode.STATIC, scale=p.scale, zero_point=p.zero_point, clip_lo=p.lo, clip_hi=p.hi)


def _layer_scale_dtype(module: nn.Linear | nn.Conv2d, config: QuantizeConfig, factors: torch.Tensor | None) -> str:
    """The layer's weight-scale dtype: as configured, or for "auto" float16 where it is exact
    (``factors``: the layer's smoothing factors, if smoothed)."""
    if config.scale_dtype != "auto":
        return config.scale_dtype
    weight = module.weight.detach().float()
    if factors is not None:  # the scales are those of the smoothed weight the bundle stores
        weight = weight * factors[None, :]
    return "float16" if float16_scales_exact(weight, config.weight_bits) else "float32"


def make_plan(pipe: Any, stats: CalibrationStats, config: QuantizeConfig, source_id: str) -> Plan:
    """Decide each denoiser layer's quantisation from calibration statistics.

    Args:
        pipe: the FP pipeline the statistics were measured on.
        stats: output of :func:`diffkiln.calibrate.calibrate`.
        config: the recipe and its options.
        source_id: the model's id (a built-in name or a folder path), recorded in the plan.

    Raises:
        ValueError: the statistics do not cover a layer of this denoiser (calibrated on another model).
    """
    denoiser = find_denoiser(pipe)
    layers = find_quantizable_layers(denoiser)
    missing = [n for n in layers if n not in stats.layers]
    if missing:
        raise ValueError(f"calibration statistics lack {len(missing)} layer(s), e.g. {missing[:3]}; recalibrate")
    defaults = fp_default_reasons(denoiser)
    bos = stats.invariant_positions() if config.bos_aware else []
    out: list[LayerPlan] = []
    for name, module in layers.items():
        if not isinstance(module, (nn.Linear, nn.Conv2d)):  # narrows the type; all layers are
            continue
        kind = "conv" if isinstance(module, nn.Conv2d) else "linear"
        params = module.weight.numel()
        reason = ""
        if _matches(name, config.exclude):
            reason = "excluded by --exclude"
        elif name in defaults and not _matches(name, config.include):
            reason = defaults[name]
        if reason:
            out.append(LayerPlan(name, kind, None, None, (), reason, params, out_channels=module.weight.shape[0]))
            continue
        st = stats.layers[name]
        rows = tuple(st.invariant_rows(bos)) if bos and kind == "linear" else ()
        act_absmax = st.channel_absmax.amax(dim=0)
        alpha = None
        if kind == "linear" and (
            config.smooth is SmoothMode.ALL
            or (
                config.smooth is SmoothMode.AUTO
                and channel_outlier_ratio(act_absmax) >= config.smooth_min_outlier_ratio
            )
        ):
            alpha = config.smooth_alpha
        factors = smoothing_factors(act_absmax, module.weight, alpha) if alpha is not None else None
        if config.act_mode is ActMode.DYNAMIC:
            act = ActSpec(mode=ActMode.DYNAMIC)
        else:
            p = choose_act_params(_range_samples(st, None, factors, rows), config.clip, bits=config.act_bits)
            steps: dict[str, tuple[Any, ...]] = {}
            if config.timestep_aware:
                per_step = [
                    choose_act_params(_range_samples(st, t, factors, rows), config.clip, bits=config.act_bits)
                    for t in range(st.samples.shape[0])
                ]
                steps = {
                    "step_timesteps": tuple(float(t) for t in stats.timesteps[: len(per_step)]),
                    "step_scales": tuple(q.scale for q in per_step),
                    "step_zero_points": tuple(q.zero_point for q in per_step),
                }
            act = ActSpec(
                bits=config.act_bits,
                mode=ActMode.STATIC,
                scale=p.scale,
                zero_point=p.zero_point,
                clip_lo=p.lo,
                clip_hi=p.hi,
                **steps,
            )
        weight = WeightSpec(bits=config.weight_bits, scale_dtype=_layer_scale_dtype(module, config, factors))
        output = _output_spec(name, st, config.clip) if kind == "conv" and config.requantize_conv_outputs else None
        out.append(LayerPlan(name, kind, weight, act, rows, "", params, alpha, module.weight.shape[0], output))
    return Plan(
        recipe=config.recipe.value,
        source={"id": source_id, "weight_hash": stats.model_hash},
        layers=tuple(out),
        bos_positions=tuple(bos),
        notes={
            "act_mode": config.act_mode.value,
            "clip": config.clip.value,
            "bos_aware": config.bos_aware,
            "weight_bits": config.weight_bits,
            "act_bits": config.act_bits,
            "smooth": config.smooth.value,
            "smooth_alpha": config.smooth_alpha,
            "smooth_min_outlier_ratio": config.smooth_min_outlier_ratio,
            "requantize_conv_outputs": config.requantize_conv_outputs,
            "quantize_config": quantize_config_to_dict(config),
            "calibration": stats.settings,
            "bos": _bos_summary(stats, stats.invariant_positions()),
        },
    )
