"""The mixed-precision recipe's config: budgets, candidates, the search and its measurement."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from diffkiln.core.errors import InvalidInputError
from diffkiln.core.plan import ActMode
from diffkiln.core.quantizers import ClipMethod
from diffkiln.optimizer.w8a8 import SmoothMode, W8A8Config

__all__ = ["MixedConfig", "WeightBudget"]


class WeightBudget(str, Enum):
    """What ``avg_weight_bits`` averages."""

    STORED = "stored"  # the bits the bundle stores per weight: codes, scales, group multipliers
    CODES = "codes"  # code bits only (MixDQ's convention); scales come on top


@dataclass(frozen=True)
class MixedConfig:
    """The mixed-precision recipe (MixDQ: metric-decoupled sensitivities, ILP bit allocation).

    The base plan's settings (``include`` ... ``smooth_min_outlier_ratio``) mean exactly what they
    mean in :class:`~diffkiln.optimizer.w8a8.W8A8Config`; its grids are 8-bit.

    Attributes:
        avg_weight_bits: the average weight bits allowed over all the denoiser's quantizable
            parameters (FP layers count 16). Default 4.0.
        avg_act_bits: the average activation bits allowed, or None to give every quantized layer
            8-bit activations. Default None.
        weight_candidates: weight bit-widths to choose from, among 2, 3, 4, 8 and 16 (16: keep in
            FP). Default (2, 4, 8, 16).
        act_candidates: activation bit-widths to choose from (16: weight-only). Default (8, 16).
        content: globs of layers forced into the content group. Default none.
        quality: globs of layers forced into the quality group. Default none.
        splits: how many content/quality budget splits to solve and measure. Default 5.
        split_step: bits between the content-group averages of neighbouring splits. Default 0.75.
        tie_qkv: give the query/key/value projections that read one tensor the same width (for
            runtimes that fuse them; found from the data flow). Default False.
        latency_budget_ms: bound on the summed latency of the searched layers, from a table
            measured on this machine's ``latency_device`` (:mod:`diffkiln.optimizer.latency`).
            Default None (no bound).
        latency_device: where the latency table is measured. Default "cpu".
        select_prompts: calibration samples (with their seeds) every candidate plan is run on, on
            the integer runtime, to pick the final plan. Default 32.
        select_confidence: standard errors by which another candidate's mean score must beat the
            first candidate's (the split nearest the even one), paired per sample, to be chosen over
            it; 0 picks the plain maximum. Default 2.0.
        uniform_candidate: also measure the widest uniform allocation that fits the budget, so the
            search never returns a plan that measures worse than it. Default True.
        group_size: store 4-, 3- and 2-bit weights with two-level groups of this many inputs.
            Default None (per channel).
        budget: what ``avg_weight_bits`` averages: stored bits per weight or code bits only.
            Default ``stored``.
        sensitivity_prompts: calibration samples each sensitivity trial runs. Default 4.
        quality_steps: denoiser calls the quality layers' trials replay. Default 5.
        workers: processes for the sensitivity trials (each rebuilds the model). Default 1.
        include: as :attr:`W8A8Config.include`.
        exclude: as :attr:`W8A8Config.exclude`.
        layer_kinds: as :attr:`W8A8Config.layer_kinds`.
        bos_aware: as :attr:`W8A8Config.bos_aware`.
        bos_positions: as :attr:`W8A8Config.bos_positions`.
        clip: as :attr:`W8A8Config.clip`.
        smooth: as :attr:`W8A8Config.smooth`.
        smooth_alpha: as :attr:`W8A8Config.smooth_alpha`.
        smooth_min_outlier_ratio: as :attr:`W8A8Config.smooth_min_outlier_ratio`.
    """

    avg_weight_bits: float = 4.0
    avg_act_bits: float | None = None
    weight_candidates: tuple[int, ...] = (2, 4, 8, 16)
    act_candidates: tuple[int, ...] = (8, 16)
    content: tuple[str, ...] = ()
    quality: tuple[str, ...] = ()
    splits: int = 5
    split_step: float = 0.75
    tie_qkv: bool = False
    latency_budget_ms: float | None = None
    latency_device: str = "cpu"
    select_prompts: int = 32
    select_confidence: float = 2.0
    uniform_candidate: bool = True
    group_size: int | None = None
    budget: WeightBudget = WeightBudget.STORED
    sensitivity_prompts: int = 4
    quality_steps: int = 5
    workers: int = 1
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    layer_kinds: tuple[str, ...] | None = None
    bos_aware: bool = True
    bos_positions: tuple[int, ...] | None = None
    clip: ClipMethod = ClipMethod.MSE
    smooth: SmoothMode = SmoothMode.AUTO
    smooth_alpha: float = 0.5
    smooth_min_outlier_ratio: float = 8.0

    def __post_init__(self) -> None:
        if not isinstance(self.budget, WeightBudget):
            valid = ", ".join(f"WeightBudget.{b.name}" for b in WeightBudget)
            raise InvalidInputError(f"budget must be a WeightBudget ({valid}), got {self.budget!r}")
        if self.group_size is not None and (self.group_size < 8 or self.group_size & (self.group_size - 1)):
            raise InvalidInputError(f"group_size must be a power of two >= 8 (e.g. 64), got {self.group_size}")
        bad = [b for b in self.weight_candidates if b not in (2, 3, 4, 8, 16)]
        if bad or not self.weight_candidates:
            raise InvalidInputError(f"weight candidates must be among 2, 3, 4, 8, 16, got {self.weight_candidates}")
        bad = [b for b in self.act_candidates if b not in (8, 16)]
        if bad or not self.act_candidates:
            raise InvalidInputError(f"activation candidates must be among 8, 16, got {self.act_candidates}")
        if not 2.0 <= self.avg_weight_bits <= 16.0:
            raise InvalidInputError(f"avg_weight_bits must be within 2..16, got {self.avg_weight_bits}")
        if self.avg_act_bits is not None and not 8.0 <= self.avg_act_bits <= 16.0:
            raise InvalidInputError(f"avg_act_bits must be within 8..16, got {self.avg_act_bits}")
        if self.latency_budget_ms is not None and self.latency_budget_ms <= 0:
            raise InvalidInputError(f"latency_budget_ms must be positive, got {self.latency_budget_ms}")
        for name in ("select_prompts", "sensitivity_prompts", "quality_steps", "workers", "splits"):
            if getattr(self, name) <= 0:
                raise InvalidInputError(f"{name} must be a positive integer, got {getattr(self, name)}")
        if self.select_confidence < 0:
            raise InvalidInputError(f"select_confidence must be >= 0 (standard errors), got {self.select_confidence}")
        if self.split_step <= 0:
            raise InvalidInputError(f"split_step must be positive, got {self.split_step}")
        self.base_config()  # validates the base plan's settings

    def base_config(self) -> W8A8Config:
        """The W8A8 base plan's settings: these layer and smoothing options, 8-bit static grids."""
        return W8A8Config(
            act_mode=ActMode.STATIC,
            clip=self.clip,
            include=self.include,
            exclude=self.exclude,
            layer_kinds=self.layer_kinds,
            bos_aware=self.bos_aware,
            bos_positions=self.bos_positions,
            smooth=self.smooth,
            smooth_alpha=self.smooth_alpha,
            smooth_min_outlier_ratio=self.smooth_min_outlier_ratio,
            scale_dtype="float32",
        )
