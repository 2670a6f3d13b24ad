"""The Plan: pure, versioned, JSON-serialisable data saying how each denoiser layer is quantised.

The Plan is one of the two contracts between stages (the other is the bundle manifest): the
optimizer writes it, export reads it. It holds no tensors and no code. See docs/plan-format.md.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from enum import Enum
from typing import Any

from diffkiln.core.cache_schedule import CacheSchedule, CacheScheduleError
from diffkiln.core.layers import CONV_KINDS, LAYER_KINDS
from diffkiln.core.packing import PACKABLE_BITS, packed_length
from diffkiln.core.sparse_plan import SparsePlan, SparsePlanError

__all__ = [
    "PLAN_FORMAT",
    "PLAN_VERSION",
    "ActMode",
    "ActSpec",
    "LayerPlan",
    "Plan",
    "PlanError",
    "WeightSpec",
    "calibration_record",
]

PLAN_FORMAT = "diffkiln.plan"
PLAN_VERSION = 5
# Version 2 added LayerPlan.output; 3 added LayerPlan.role / evidence, Plan.denoiser and the kinds
# conv1d / conv3d; 4 added Plan.cache; 5 added Plan.sparse. Older plans read as ones without them.
_READABLE_VERSIONS = (1, 2, 3, 4, 5)


class PlanError(ValueError):
    """A plan file is malformed, of another format, or of an unsupported version."""


class ActMode(str, Enum):
    """How a layer's input activation is quantised."""

    STATIC = "static"  # per tensor, asymmetric, range fixed by calibration
    DYNAMIC = "dynamic"  # per token, symmetric, range computed at run time


@dataclass(frozen=True)
class WeightSpec:
    """Integer weights: symmetric, per output channel.

    Attributes:
        bits: 8, or 7 (int8 storage on the grid [-63, 63]: with 8-bit activations, oneDNN's
            int8 kernels are exact on x86 CPUs without VNNI only then), or 4 / 3 / 2 (mixed
            precision: stored packed two per byte / eight per three bytes / four per byte).
        granularity: "per_channel".
        symmetric: True.
        scale_dtype: "float32" or "float16" (mixed precision: halves the scales' bytes; the
            codes are rounded against the float16 scale). Default "float32".
        group_size: 4-, 3- and 2-bit weights only: two-level grouping, an integer multiplier (1..15)
            per group of this many inputs on top of the per-channel scale
            (:func:`diffkiln.core.quantizers.quantize_weight_grouped`); granularity is then
            "per_group". A power of two >= 8. Default None (per channel).
    """

    bits: int = 8
    granularity: str = "per_channel"
    symmetric: bool = True
    scale_dtype: str = "float32"
    group_size: int | None = None

    def __post_init__(self) -> None:
        if self.bits not in (2, 3, 4, 7, 8):
            raise ValueError(f"weight bits must be 2, 3, 4, 7 or 8, got {self.bits}")
        if self.group_size is not None:
            if self.bits not in (2, 3, 4):
                raise ValueError(f"group_size applies to 4-, 3- and 2-bit weights, not {self.bits}-bit")
            if self.group_size < 8 or self.group_size & (self.group_size - 1):
                raise ValueError(f"group_size must be a power of two >= 8, got {self.group_size}")
            if self.granularity != "per_group":
                object.__setattr__(self, "granularity", "per_group")
        if self.scale_dtype not in ("float32", "float16"):
            raise ValueError(f"scale_dtype must be 'float32' or 'float16', got {self.scale_dtype!r}")


@dataclass(frozen=True)
class ActSpec:
    """Integer activations.

    Attributes:
        bits: 8, or 7 (static only: codes in [-64, 63]).
        mode: static (per tensor, asymmetric) or dynamic (per token, symmetric).
        scale: static step size (None in dynamic mode).
        zero_point: static zero point within the grid's codes (None in dynamic mode).
        clip_lo: lower end of the chosen clipping range (static), for reports.
        clip_hi: upper end of the chosen clipping range (static), for reports.
        step_timesteps: timestep-aware ranges only: the calibrated sampler timesteps, one per
            step; the runtime uses the range of the nearest one. Empty: one range for all steps.
        step_scales: one static step size per entry of ``step_timesteps``.
        step_zero_points: one static zero point per entry of ``step_timesteps``.
    """

    bits: int = 8
    mode: ActMode = ActMode.STATIC
    scale: float | None = None
    zero_point: int | None = None
    clip_lo: float | None = None
    clip_hi: float | None = None
    step_timesteps: tuple[float, ...] = ()
    step_scales: tuple[float, ...] = ()
    step_zero_points: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        n = len(self.step_timesteps)
        if len(self.step_scales) != n or len(self.step_zero_points) != n:
            raise ValueError("step_timesteps, step_scales and step_zero_points need the same length")
        if n and self.mode is not ActMode.STATIC:
            raise ValueError("timestep-aware ranges need static activations")
        if any(s <= 0 for s in self.step_scales):
            raise ValueError("every step scale must be positive")
        if self.bits not in (7, 8):
            raise ValueError(f"activation bits must be 7 or 8, got {self.bits}")
        if self.bits != 8 and self.mode is not ActMode.STATIC:
            raise ValueError("7-bit activations are supported in static mode only")
        if self.mode is ActMode.STATIC and (self.scale is None or self.zero_point is None):
            raise ValueError("a static activation spec needs scale and zero_point")
        if self.scale is not None and self.scale <= 0:
            raise ValueError(f"activation scale must be positive, got {self.scale}")


def _act_from_dict(d: dict[str, Any]) -> ActSpec:
    steps = {k: tuple(d.get(k, ())) for k in ("step_timesteps", "step_scales", "step_zero_points")}
    return ActSpec(**{**d, **steps, "mode": ActMode(d["mode"])})


@dataclass(frozen=True)
class LayerPlan:
    """The decision for one quantizable layer of the denoiser.

    Attributes:
        name: qualified module name inside the denoiser.
        kind: "linear", "conv1d", "conv" (2-D) or "conv3d" (:mod:`diffkiln.core.layers`).
        weight: integer weight spec, or None to keep the layer in floating point.
        act: integer activation spec, or None: float activations (weight-only quantization,
            e.g. W4A16, when ``weight`` is set; the whole layer in FP when it is not).
        bos_positions: text positions whose output rows are precomputed in FP (BOS-aware).
        reason: why the layer is kept in FP, when it is ("" otherwise).
        params: number of weight parameters (for averages).
        smooth_alpha: SmoothQuant strength when the layer's input channels are smoothed, else
            None. The factors follow from calibration and weights
            (:func:`diffkiln.core.smoothing.smoothing_factors`).
        out_channels: the weight's first dimension (output features or channels), which sizes
            the scales; 0 in plans written before it was recorded (stored sizes then unknown).
            Default 0.
        output: convolutions with static integer activations only: the static int8 grid the
            output is requantized onto (``QuantizeLinear -> DequantizeLinear`` after the
            convolution), so that runtimes whose integer convolutions produce int8 (onnxruntime's
            QLinearConv) run it in integer. None: the output stays in float. Default None.
        role: the layer's structural role when it has one (``input_projection``,
            ``output_projection``, ``conditioning_embedder``, ``weight_read_by_parent``, ``unused``,
            ``unsupported``), found from the data flow; "" otherwise. Default "".
        evidence: the data-flow evidence for ``role``. Default "".
    """

    name: str
    kind: str
    weight: WeightSpec | None
    act: ActSpec | None
    bos_positions: tuple[int, ...] = ()
    reason: str = ""
    params: int = 0
    smooth_alpha: float | None = None
    out_channels: int = 0
    output: ActSpec | None = None
    role: str = ""
    evidence: str = ""

    def __post_init__(self) -> None:
        if self.kind not in LAYER_KINDS:
            raise ValueError(f"{self.name}: unknown layer kind {self.kind!r}; valid: {list(LAYER_KINDS)}")
        if self.output is None:
            return
        if self.kind not in CONV_KINDS or self.act is None or self.act.mode is not ActMode.STATIC:
            raise ValueError(f"{self.name}: an output grid needs a convolution with static integer activations")
        if self.output.mode is not ActMode.STATIC or self.output.bits != 8 or self.output.step_timesteps:
            raise ValueError(f"{self.name}: the output grid must be static, 8-bit and one range for all steps")

    @property
    def quantized(self) -> bool:
        """True when the layer's weights are stored as integers."""
        return self.weight is not None

    @property
    def weight_only(self) -> bool:
        """True when the weights are integers but the activations stay in floating point."""
        return self.weight is not None and self.act is None

    def stored_bits(self) -> int:
        """Bits the bundle stores for this layer's weight as planned (see :meth:`stored_bits_as`)."""
        return self.stored_bits_as(self.weight)

    def stored_bits_as(self, spec: WeightSpec | None) -> int:
        """Bits the bundle would store for this layer's weight in the format ``spec``.

        Counts what differs between weight formats, exactly as ``export.freeze`` writes it:
        codes (int8, or packed rows of 4/3/2 bits), per-channel scales, group multipliers
        (uint8), smoothing factors (float32) and BOS rows (float32). A layer kept in FP counts
        16 bits per weight (FP16, the reference of every size ratio). Biases and the scalar
        activation grid are left out: every format stores them alike.

        Args:
            spec: the weight format to size; None sizes the layer kept in FP.

        Raises:
            ValueError: the plan does not record ``out_channels`` (written by an older diffkiln).
        """
        if spec is None:
            return 16 * self.params
        n = self.out_channels
        if n <= 0 or self.params % n:
            raise ValueError(f"{self.name}: the plan records no output channels; re-plan to size its storage")
        k = self.params // n
        codes = n * (packed_length(k, spec.bits) if spec.bits in PACKABLE_BITS else k) * 8
        scales = n * (16 if spec.scale_dtype == "float16" else 32)
        mults = n * -(-k // spec.group_size) * 8 if spec.group_size else 0
        smooth = 32 * k if self.smooth_alpha is not None else 0
        bos = 32 * n * len(self.bos_positions)
        return codes + scales + mults + smooth + bos


@dataclass(frozen=True)
class Plan:
    """How to compress one pipeline's denoiser.

    Attributes:
        recipe: e.g. "w8a8".
        source: the model's id and weight hash.
        layers: one LayerPlan per quantizable layer of the denoiser, in module order.
        bos_positions: the prompt-invariant text positions found by calibration.
        notes: free-form build information (calibration settings, clipping method).
        denoiser: the pipeline component the plan quantizes ("" for a bare module or a plan
            written before it was recorded). Default "".
        cache: the searched cache schedule (:class:`~diffkiln.core.cache_schedule.CacheSchedule`),
            or None: every step computes every block. Default None.
        sparse: the searched sparse-attention masks (:class:`~diffkiln.core.sparse_plan.SparsePlan`),
            or None: attention runs dense. Default None.
    """

    recipe: str
    source: dict[str, str]
    layers: tuple[LayerPlan, ...]
    bos_positions: tuple[int, ...] = ()
    notes: dict[str, Any] = field(default_factory=dict)
    denoiser: str = ""
    cache: CacheSchedule | None = None
    sparse: SparsePlan | None = None

    def layer(self, name: str) -> LayerPlan:
        """The plan of one layer.

        Raises:
            KeyError: unknown layer; the message shows a few valid names.
        """
        for lp in self.layers:
            if lp.name == name:
                return lp
        raise KeyError(f"no layer {name!r} in the plan; e.g. {[lp.name for lp in self.layers[:5]]}")

    def _avg(self, bits_of: Any) -> float:
        total = sum(lp.params for lp in self.layers)
        if total == 0:
            return 0.0
        return sum(bits_of(lp) * lp.params for lp in self.layers) / total

    @property
    def avg_weight_bits(self) -> float:
        """Parameter-weighted average weight bits (FP layers count as 16)."""
        return self._avg(lambda lp: lp.weight.bits if lp.weight else 16)

    @property
    def avg_stored_weight_bits(self) -> float:
        """Parameter-weighted average of the weight bits stored, scales and multipliers included
        (:meth:`LayerPlan.stored_bits`; FP layers count 16)."""
        total = sum(lp.params for lp in self.layers)
        return sum(lp.stored_bits() for lp in self.layers) / total if total else 0.0

    @property
    def avg_act_bits(self) -> float:
        """Parameter-weighted average activation bits (FP layers count as 16)."""
        return self._avg(lambda lp: lp.act.bits if lp.act else 16)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict, with format name and version."""
        d = {"format": PLAN_FORMAT, "version": PLAN_VERSION, **asdict(self)}
        d["cache"] = self.cache.to_dict() if self.cache is not None else None
        d["sparse"] = self.sparse.to_dict() if self.sparse is not None else None
        return d

    def to_json(self) -> str:
        """The plan as a JSON document."""
        return json.dumps(self.to_dict(), indent=2, default=lambda e: e.value)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Plan:
        """Rebuild a plan from :meth:`to_dict` output.

        Raises:
            PlanError: another format, an unsupported version, or a malformed entry.
        """
        if d.get("format") != PLAN_FORMAT:
            raise PlanError(f"not a diffkiln plan (format {d.get('format')!r}, expected {PLAN_FORMAT!r})")
        if d.get("version") not in _READABLE_VERSIONS:
            raise PlanError(
                f"plan version {d.get('version')!r} is not supported; this diffkiln reads {list(_READABLE_VERSIONS)}"
            )
        try:
            layers = tuple(
                LayerPlan(
                    name=lp["name"],
                    kind=lp["kind"],
                    weight=WeightSpec(**lp["weight"]) if lp["weight"] else None,
                    act=_act_from_dict(lp["act"]) if lp["act"] else None,
                    bos_positions=tuple(lp["bos_positions"]),
                    reason=lp["reason"],
                    params=lp["params"],
                    smooth_alpha=lp.get("smooth_alpha"),
                    out_channels=lp.get("out_channels", 0),
                    output=_act_from_dict(lp["output"]) if lp.get("output") else None,
                    role=lp.get("role", ""),
                    evidence=lp.get("evidence", ""),
                )
                for lp in d["layers"]
            )
            return cls(
                d["recipe"],
                dict(d["source"]),
                layers,
                tuple(d["bos_positions"]),
                dict(d["notes"]),
                str(d.get("denoiser", "")),
                CacheSchedule.from_dict(d["cache"]) if d.get("cache") is not None else None,
                SparsePlan.from_dict(d["sparse"]) if d.get("sparse") is not None else None,
            )
        except CacheScheduleError as exc:
            raise PlanError(f"malformed plan: its cache schedule: {exc}") from exc
        except SparsePlanError as exc:
            raise PlanError(f"malformed plan: its sparse-attention masks: {exc}") from exc
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise PlanError(f"malformed plan: {type(exc).__name__}: {exc}") from exc

    @classmethod
    def from_json(cls, text: str) -> Plan:
        """Parse a plan JSON document (see :meth:`from_dict`)."""
        try:
            return cls.from_dict(json.loads(text))
        except json.JSONDecodeError as exc:
            raise PlanError(f"plan is not valid JSON: {exc}") from exc


def calibration_record(manifest: Mapping[str, Any]) -> dict[str, Any]:
    """What a bundle manifest's plan recorded of its calibration (``plan.notes.calibration``: call
    arguments, prompts, source, how the denoiser was found), or ``{}`` where it recorded none."""
    plan = manifest.get("plan")
    notes = plan.get("notes") if isinstance(plan, Mapping) else None
    record = notes.get("calibration") if isinstance(notes, Mapping) else None
    return dict(record) if isinstance(record, Mapping) else {}
