"""The W8A8 recipe: int8 (or 7-bit) per-channel weights and int8 activations on every layer it can.

Which layers stay in floating point is read from the traced data flow, never from layer names
(:func:`diffkiln.optimizer.roles.structural_roles`): the input and output projections and the
conditioning embedders by default; layers whose weight their parent reads, that never ran, or
that have no integer kernel, always. ``include``/``exclude`` globs override the defaults, and
``exclude`` applies before anything needs a layer's statistics.
"""

from __future__ import annotations

import fnmatch
import logging
from dataclasses import dataclass
from enum import Enum
from typing import Any

import torch
from torch import nn

from diffkiln.calibrate.stats import CalibrationStats, LayerStats
from diffkiln.core.configs import config_to_dict
from diffkiln.core.errors import InvalidInputError
from diffkiln.core.layers import LAYER_KINDS, find_quantizable_layers, layer_kind
from diffkiln.core.pipelines import find_denoiser
from diffkiln.core.plan import ActMode, ActSpec, LayerPlan, Plan, WeightSpec
from diffkiln.core.quantizers import ClipMethod, choose_act_params, float16_scales_exact
from diffkiln.core.smoothing import channel_outlier_ratio, smoothing_factors
from diffkiln.optimizer.registry import SearchContext, register_recipe
from diffkiln.optimizer.roles import RoleFinding, structural_roles

__all__ = ["SmoothMode", "W8A8Config", "fp_reasons", "plan_w8a8", "stats_denoiser"]

log = logging.getLogger(__name__)


class SmoothMode(str, Enum):
    """Which Linear layers get SmoothQuant input-channel smoothing."""

    AUTO = "auto"  # layers with outlier input channels (see W8A8Config.smooth_min_outlier_ratio)
    ALL = "all"
    OFF = "off"


_SCALE_DTYPES = ("auto", "float32", "float16")


@dataclass(frozen=True)
class W8A8Config:
    """The W8A8 recipe.

    Attributes:
        act_mode: static per-tensor (from calibration) or dynamic per-token activations. Default static.
        clip: how static activation ranges are chosen. Default MSE.
        include: globs of layer names to quantize although kept in FP by default (input/output
            projections, conditioning embedders). Default none.
        exclude: globs of layer names to keep in FP. Default none.
        layer_kinds: the layer kinds to quantize ("linear", "conv1d", "conv", "conv3d"); the others
            stay in FP, e.g. ``("linear",)`` for a runtime that quantizes nn.Linear only
            (MindIE-SD). None: every kind. Default None.
        bos_aware: precompute verified prompt-invariant text rows (BOS) in FP and leave them out
            of the activation range. Default True.
        bos_positions: text positions to treat as prompt-invariant instead of the ones calibration
            verified (e.g. ``(0,)`` for a bare module's CLIP-encoded input); each layer still keeps
            only those it read identically for every prompt. None: the verified ones. Default None.
        weight_bits: the weight grid, 8, or 7 for x86 CPUs without VNNI: there oneDNN's int8 GEMM
            and convolution are exact only if weights (or activations) use 7 bits. Default 8.
        act_bits: the static activation grid, 8 or 7 (static mode only), the other way to the same
            fast path. Default 8.
        smooth: which Linear layers get SmoothQuant input-channel smoothing
            (:mod:`diffkiln.core.smoothing`): AUTO, those with outlier channels; ALL; OFF. Default AUTO.
        smooth_alpha: smoothing strength in (0, 1). Default 0.5.
        smooth_min_outlier_ratio: in AUTO mode, smooth a layer when its largest input-channel
            maximum is at least this many times the median channel's. Default 8.0.
        timestep_aware: static mode only: one activation range per calibrated sampler step (as
            msModelSlim's timestep-aware W8A8); the runtime uses the range of the nearest
            calibrated timestep. Default False.
        scale_dtype: "float32", "float16" or "auto" per-channel weight scales; "auto" takes float16
            where every scale lies in float16's normal range (exact:
            :func:`~diffkiln.core.quantizers.float16_scales_exact`). Default "auto".
        requantize_conv_outputs: static mode only: requantize each integer convolution's output
            onto a static int8 grid chosen from calibration (``LayerPlan.output``), as onnxruntime's
            ``quantize_static`` does, so runtimes whose integer convolutions produce int8
            (onnxruntime's QLinearConv) run them in integer; costs one more rounding per
            convolution. Default False.
    """

    act_mode: ActMode = ActMode.STATIC
    clip: ClipMethod = ClipMethod.MSE
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    layer_kinds: tuple[str, ...] | None = None
    bos_aware: bool = True
    bos_positions: tuple[int, ...] | None = None
    weight_bits: int = 8
    act_bits: int = 8
    smooth: SmoothMode = SmoothMode.AUTO
    smooth_alpha: float = 0.5
    smooth_min_outlier_ratio: float = 8.0
    timestep_aware: bool = False
    scale_dtype: str = "auto"
    requantize_conv_outputs: bool = False

    def __post_init__(self) -> None:
        for field_name, enum in (("act_mode", ActMode), ("clip", ClipMethod), ("smooth", SmoothMode)):
            value = getattr(self, field_name)
            if not isinstance(value, enum):
                raise InvalidInputError(f"{field_name} must be one of {[e.value for e in enum]}, got {value!r}")
        if self.weight_bits not in (7, 8):
            raise InvalidInputError(
                f"weight_bits is the W8A8 grid, 7 or 8, got {self.weight_bits}; for an average such as 4 use "
                "--recipe mixed --avg-weight-bits"
            )
        if self.act_bits not in (7, 8):
            raise InvalidInputError(f"act_bits is the W8A8 activation grid, 7 or 8, got {self.act_bits}")
        static = self.act_mode is ActMode.STATIC
        if self.act_bits != 8 and not static:
            raise InvalidInputError("7-bit activations need static activations; drop --act-mode dynamic")
        if not 0.0 < self.smooth_alpha < 1.0:
            raise InvalidInputError(f"smooth_alpha must be in (0, 1), e.g. 0.5; got {self.smooth_alpha}")
        if self.timestep_aware and not static:
            raise InvalidInputError("--timestep-aware needs static activations; drop --act-mode dynamic")
        if self.scale_dtype not in _SCALE_DTYPES:
            raise InvalidInputError(f"scale_dtype must be one of {list(_SCALE_DTYPES)}, got {self.scale_dtype!r}")
        if self.requantize_conv_outputs and not static:
            raise InvalidInputError("--requantize-conv-outputs needs static activations; drop --act-mode dynamic")
        if self.smooth_min_outlier_ratio < 1.0:
            raise InvalidInputError(f"smooth_min_outlier_ratio must be >= 1, got {self.smooth_min_outlier_ratio}")
        check_layer_kinds(self.layer_kinds)


WIDE_STEP_RANGE = 16.0
"""A layer whose largest input magnitude at one sampler step is this many times that at another
loses four of its eight bits at the quieter step under one static range for all steps."""


def _step_range_ratio(st: LayerStats) -> float:
    """The largest over the smallest of the layer's per-step input magnitudes."""
    per_step = st.channel_absmax.amax(dim=1)  # (T, C) -> (T,)
    if per_step.numel() < 2:
        return 1.0
    return float(per_step.max() / per_step.min().clamp_min(torch.finfo(torch.float32).tiny))


def _matches(name: str, globs: tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatchcase(name, g) for g in globs)


def stats_denoiser(model: Any, stats: CalibrationStats) -> nn.Module:
    """The denoiser of ``model`` the statistics were recorded on (their component name)."""
    return find_denoiser(model, stats.denoiser or None)


def check_layer_kinds(kinds: tuple[str, ...] | None) -> None:
    """Raise InvalidInputError naming the valid kinds when ``kinds`` holds another."""
    if kinds is not None and (not kinds or set(kinds) - set(LAYER_KINDS)):
        raise InvalidInputError(f"layer_kinds must be some of {list(LAYER_KINDS)}, got {kinds!r}")


def fp_reasons(
    denoiser: nn.Module,
    stats: CalibrationStats,
    include: tuple[str, ...],
    exclude: tuple[str, ...],
    layer_kinds: tuple[str, ...] | None = None,
) -> dict[str, tuple[str, RoleFinding | None]]:
    """The layers kept in FP and why: ``name -> (reason, role finding or None)``.

    ``exclude`` first; then layers of kinds outside ``layer_kinds``; then roles that are always FP;
    then default roles unless ``include`` names the layer.
    """
    roles = structural_roles(denoiser, stats.graph)
    out: dict[str, tuple[str, RoleFinding | None]] = {}
    for name, module in find_quantizable_layers(denoiser).items():
        finding = roles.get(name)
        kind = layer_kind(module)
        if _matches(name, exclude):
            out[name] = ("excluded by --exclude", finding)
        elif layer_kinds is not None and kind not in layer_kinds:
            out[name] = (f"a {kind} layer; the plan quantizes only {', '.join(layer_kinds)}", finding)
        elif finding is not None and (finding.role.always_fp or not _matches(name, include)):
            out[name] = (finding.reason, finding)
    return out


def _bos_summary(stats: CalibrationStats, positions: list[int]) -> dict[str, Any]:
    emb = stats.text_embeds.float().nan_to_num(0.0)  # NaN: a position a shorter sample lacks
    if emb.dim() != 3 or not positions:
        return {}
    absmax = emb.abs().amax(dim=(0, 2))
    others = [i for i in range(emb.shape[1]) if i not in positions]
    return {
        "bos_absmax": float(absmax[positions].max()),
        "other_tokens_absmax": float(absmax[others].max()) if others else None,
        "other_tokens_absmax_median": float(absmax[others].median()) if others else None,
        "evidence": {k: v.get("evidence", "") for k, v in stats.bos.items()},
    }


def range_samples(
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
        # One step's samples miss its tails; the recorded exact extremes of the step let the
        # range search see them (per-step ranges from samples alone lost several dB on shapes-unet).
        extremes = torch.stack([st.min[sel].min(), st.max[sel].max()]).to(samples.dtype)
        samples = torch.cat([samples, extremes])
    return samples


def _output_spec(name: str, st: LayerStats, clip: ClipMethod) -> ActSpec:
    """The static int8 grid a convolution's output is requantized onto, chosen from the output
    samples of all steps.

    Raises:
        ValueError: the statistics hold no output samples (calibrated by an older diffkiln).
    """
    if not st.has_output:
        raise ValueError(f"{name}: the calibration statistics hold no output samples; recalibrate")
    p = choose_act_params(st.out_samples.flatten(), clip, bits=8)
    return ActSpec(bits=8, mode=ActMode.STATIC, scale=p.scale, zero_point=p.zero_point, clip_lo=p.lo, clip_hi=p.hi)


def _weight(module: nn.Module) -> torch.Tensor:
    w = module.weight
    assert isinstance(w, torch.Tensor)  # every quantizable layer type has a weight tensor
    return w


def _layer_scale_dtype(module: nn.Module, config: W8A8Config, factors: torch.Tensor | None) -> str:
    """The layer's weight-scale dtype: as configured, or for "auto" float16 where it is exact."""
    if config.scale_dtype != "auto":
        return config.scale_dtype
    weight = _weight(module).detach().float()
    if factors is not None:  # the scales are those of the smoothed weight the bundle stores
        weight = weight * factors[None, :]
    return "float16" if float16_scales_exact(weight, config.weight_bits) else "float32"


def _act_spec(st: LayerStats, config: W8A8Config, factors: torch.Tensor | None, rows: tuple[int, ...],
              timesteps: list[float]) -> ActSpec:  # fmt: skip
    if config.act_mode is ActMode.DYNAMIC:
        return ActSpec(mode=ActMode.DYNAMIC)
    p = choose_act_params(range_samples(st, None, factors, rows), config.clip, bits=config.act_bits)
    steps: dict[str, tuple[Any, ...]] = {}
    if config.timestep_aware:
        per_step = [
            choose_act_params(range_samples(st, t, factors, rows), config.clip, bits=config.act_bits)
            for t in range(st.samples.shape[0])
        ]
        steps = {
            "step_timesteps": tuple(float(t) for t in timesteps[: len(per_step)]),
            "step_scales": tuple(q.scale for q in per_step),
            "step_zero_points": tuple(q.zero_point for q in per_step),
        }
    return ActSpec(bits=config.act_bits, mode=ActMode.STATIC, scale=p.scale, zero_point=p.zero_point,
                   clip_lo=p.lo, clip_hi=p.hi, **steps)  # fmt: skip


def _rows(name: str, stats: CalibrationStats, config: W8A8Config) -> tuple[int, ...]:
    if not config.bos_aware:
        return ()
    if config.bos_positions is not None:
        st = stats.layers[name]
        return tuple(st.invariant_rows(list(config.bos_positions)))
    return tuple(stats.layer_bos_positions(name))


def plan_w8a8(model: Any, stats: CalibrationStats, config: W8A8Config, context: SearchContext) -> Plan:
    """Decide each denoiser layer's quantization from calibration statistics (the W8A8 recipe).

    Args:
        model: the FP pipeline or bare module the statistics were measured on.
        stats: output of :func:`diffkiln.calibrate.calibrate`.
        config: the recipe's settings.
        context: the model's id (recorded in the plan).

    Raises:
        InvalidInputError: the statistics lack a layer that is to be quantized (calibrated on
            another model); the message names it.
    """
    denoiser = stats_denoiser(model, stats)
    layers = find_quantizable_layers(denoiser)
    fp = fp_reasons(denoiser, stats, config.include, config.exclude, config.layer_kinds)
    missing = [n for n in layers if n not in fp and n not in stats.layers]
    if missing:
        raise InvalidInputError(
            f"the calibration statistics lack {len(missing)} layer(s), e.g. {missing[:3]}; recalibrate, or keep "
            "them in FP with --exclude"
        )
    out: list[LayerPlan] = []
    wide: list[str] = []  # layers whose ranges differ widely between steps, under one static range
    for name, module in layers.items():
        kind = layer_kind(module) or ""
        weight_t = _weight(module)
        params, n_out = weight_t.numel(), int(weight_t.shape[0])
        if name in fp:
            reason, finding = fp[name]
            role = finding.role.value if finding else ""
            evidence = finding.evidence if finding else ""
            out.append(LayerPlan(name, kind, None, None, (), reason, params, out_channels=n_out, role=role,
                                 evidence=evidence))  # fmt: skip
            continue
        st = stats.layers[name]
        rows = _rows(name, stats, config) if kind == "linear" else ()
        act_absmax = st.channel_absmax.amax(dim=0)
        outliers = channel_outlier_ratio(act_absmax) >= config.smooth_min_outlier_ratio
        smooth = kind == "linear" and (
            config.smooth is SmoothMode.ALL or (config.smooth is SmoothMode.AUTO and outliers)
        )
        alpha = config.smooth_alpha if smooth else None
        factors = smoothing_factors(act_absmax, weight_t, alpha) if alpha is not None else None
        act = _act_spec(st, config, factors, rows, stats.timesteps)
        if act.mode is ActMode.STATIC and not act.step_scales and _step_range_ratio(st) >= WIDE_STEP_RANGE:
            wide.append(name)
        weight = WeightSpec(bits=config.weight_bits, scale_dtype=_layer_scale_dtype(module, config, factors))
        output = _output_spec(name, st, config.clip) if kind != "linear" and config.requantize_conv_outputs else None
        out.append(LayerPlan(name, kind, weight, act, rows, "", params, alpha, n_out, output))
    bos = sorted({p for lp in out for p in lp.bos_positions})
    if wide:
        log.warning(
            "%d layer(s) see input ranges at least %.0fx apart between sampler steps (e.g. %s) under one static "
            "range; --timestep-aware gives each step its own (W8A8Config(timestep_aware=True))",
            len(wide), WIDE_STEP_RANGE, ", ".join(wide[:3]),
        )  # fmt: skip
    return Plan(
        recipe="w8a8",
        source={"id": context.source_id, "weight_hash": stats.model_hash},
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
            "requantize_conv_outputs": config.requantize_conv_outputs,
            "recipe_config": config_to_dict(config),
            "calibration": stats.settings,
            "bos": _bos_summary(stats, stats.invariant_positions()),
            "wide_step_ranges": wide,
        },
        denoiser=stats.denoiser,
    )


register_recipe("w8a8", W8A8Config)(plan_w8a8)
