"""The mixed-precision recipe: sensitivities -> ILP bit allocation -> the best measured plan (MixDQ).

1. A W8A8 base plan gives every layer its static activation grid, smoothing and BOS rows. Layers
   the W8A8 recipe keeps in FP because they sit in conditioning embeddings join the search with
   the candidates 8 and 16 only; the first and last layer (and ``--exclude``) stay in FP.
2. :func:`diffkiln.optimizer.sensitivity.analyze_sensitivity` measures each layer alone at each
   candidate, content layers by SSIM of final images, quality layers by denoiser-output SQNR.
3. The weight budget (an average over *all* the denoiser's Linear/Conv2d parameters, FP layers
   counting 16 bits; by default in stored bits, scales and group multipliers included, as
   ``Plan.avg_stored_weight_bits`` reports, or in code bits, as ``Plan.avg_weight_bits`` and
   MixDQ count) is split between the content and the
   quality group at several ratios; for each split one ILP per group
   (:func:`diffkiln.optimizer.allocation.allocate_bits`) minimizes the group's summed error.
   Errors differ in kind between groups (1 - SSIM vs noise power), which is why the split is
   searched rather than solved in one program.
4. Each split's plan is built and run on the real integer runtime modules over the trial prompts;
   the plan whose final images are closest to FP (mean SSIM) wins.

Activations: without an activation budget every quantized layer keeps 8-bit activations
(W*A8). With one, a second ILP chooses 8 or 16 (weight-only) per layer.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import numpy as np
import torch

from diffkiln.calibrate.stats import CalibrationStats
from diffkiln.core.pipelines import find_denoiser
from diffkiln.core.plan import LayerPlan, Plan, WeightSpec
from diffkiln.kernels.packing import PACKABLE_BITS
from diffkiln.optimizer.allocation import InfeasibleBudgetError, LayerOptions, allocate_bits
from diffkiln.optimizer.latency import LatencyTable, measure_layer_latency
from diffkiln.optimizer.planner import QuantizeConfig, fp_default_reasons, make_plan
from diffkiln.optimizer.roles import LayerRole, layer_roles
from diffkiln.optimizer.sensitivity import (
    SensitivityConfig,
    SensitivityTable,
    analyze_sensitivity,
    calibration_run_kwargs,
)
from diffkiln.optimizer.simulate import layer_sims

__all__ = [
    "MixedConfig",
    "MixedResult",
    "WeightBudget",
    "allocate_mixed",
    "make_mixed_plan",
    "mixed_sensitivity",
    "select_candidate",
    "uniform_plan",
]

# Conditioning layers (timestep/text embedders): their error reaches every token, so no ternary
# (2-bit) codes; 4 bits is what the uniform W4A8 reference gives them too.
_RESTRICTED_CANDIDATES = (4, 8, 16)


class WeightBudget(str, Enum):
    """What ``--weight-bits`` averages."""

    STORED = "stored"  # the bits the bundle stores per weight: codes, scales, group multipliers
    CODES = "codes"  # code bits only (MixDQ's convention); scales come on top


@dataclass(frozen=True)
class MixedConfig:
    """The mixed-precision search.

    Attributes:
        weight_bits: the average weight bits allowed over all the denoiser's Linear/Conv2d
            parameters (FP layers count 16). Default 4.0.
        act_bits: the average activation bits allowed, or None to give every quantized layer
            8-bit activations. Default None.
        weight_candidates: weight bit-widths to choose from, among 2, 3, 4, 8 and 16 (16: keep in FP).
            Default (2, 4, 8, 16).
        act_candidates: activation bit-widths to choose from (16: weight-only). Default (8, 16).
        content: globs of layers forced into the content group. Default none.
        quality: globs of layers forced into the quality group. Default none.
        splits: how many content/quality budget splits to solve and measure. Default 5.
        split_step: bits between the content-group averages of neighbouring splits. Default 0.75.
        tie_qkv: give the q, k and v projections of each attention the same width (for runtimes
            that fuse them). Default False.
        latency_budget_ms: bound on the summed latency of the searched layers, from a table
            measured on this machine's ``latency_device`` (:mod:`diffkiln.optimizer.latency`); each
            group gets the share it has when every layer runs at 8 bits. Default None (no bound).
        latency_device: where the latency table is measured. Default "cpu".
        select_prompts: calibration prompts (with their seeds) every candidate plan is run on,
            on the integer runtime, to pick the final plan (at most the calibration prompts).
            Default 32: with 8, a split that lost 8 points of content accuracy on shapes-dit
            ranked first by chance (BENCHMARKS.md, 2026-12-03).
        select_confidence: standard errors by which another candidate's mean SSIM must beat the
            first candidate's (the split nearest the even one), paired per prompt, to be chosen
            over it; 0 picks the plain maximum. Default 2.0.
        uniform_candidate: also measure the widest uniform allocation that fits the budget (every
            searched layer at one width), so the search never returns a plan that measures worse
            than it. Default True.
        group_size: store 4-, 3- and 2-bit weights with two-level groups of this many inputs (an
            integer multiplier per group on the per-channel scale; see
            :class:`~diffkiln.core.plan.WeightSpec`). Default None (per channel).
        budget: what ``weight_bits`` averages: ``stored`` bits per weight (codes, float16
            scales and group multipliers, so the budget is the bundle's weight bytes) or ``codes``
            only. Default ``stored``.
    """

    weight_bits: float = 4.0
    act_bits: float | None = None
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

    def __post_init__(self) -> None:
        if not isinstance(self.budget, WeightBudget):
            valid = ", ".join(f"WeightBudget.{b.name}" for b in WeightBudget)
            raise ValueError(f"budget must be a WeightBudget ({valid}), got {self.budget!r}")
        if self.group_size is not None and (self.group_size < 8 or self.group_size & (self.group_size - 1)):
            raise ValueError(f"group_size must be a power of two >= 8 (e.g. 64), got {self.group_size}")
        bad = [b for b in self.weight_candidates if b not in (2, 3, 4, 8, 16)]
        if bad or not self.weight_candidates:
            raise ValueError(f"weight candidates must be among 2, 3, 4, 8, 16, got {self.weight_candidates}")
        bad = [b for b in self.act_candidates if b not in (8, 16)]
        if bad or not self.act_candidates:
            raise ValueError(f"activation candidates must be among 8, 16, got {self.act_candidates}")
        if not 2.0 <= self.weight_bits <= 16.0:
            raise ValueError(f"weight_bits (an average) must be within 2..16, got {self.weight_bits}")
        if self.act_bits is not None and not 8.0 <= self.act_bits <= 16.0:
            raise ValueError(f"act_bits (an average) must be within 8..16, got {self.act_bits}")
        if self.latency_budget_ms is not None and self.latency_budget_ms <= 0:
            raise ValueError(f"latency_budget_ms must be positive, got {self.latency_budget_ms}")
        if self.select_prompts <= 0:
            raise ValueError(f"select_prompts must be a positive integer, got {self.select_prompts}")
        if self.select_confidence < 0:
            raise ValueError(f"select_confidence must be >= 0 (standard errors), got {self.select_confidence}")
        if self.splits <= 0 or self.split_step <= 0:
            raise ValueError(f"splits and split_step must be positive, got {self.splits} and {self.split_step}")


@dataclass(frozen=True)
class MixedResult:
    """A mixed plan with what the search measured.

    Attributes:
        plan: the chosen plan.
        table: the sensitivities it was allocated from.
        candidates: per split tried: the content/quality averages, the plan's average bits and the
            measured mean SSIM of its final images against FP (real integer runtime).
        chosen: index of the chosen candidate.
    """

    plan: Plan
    table: SensitivityTable
    candidates: list[dict[str, Any]] = field(default_factory=list)
    chosen: int = 0


def _qkv_tie(name: str) -> str:
    parent, _, leaf = name.rpartition(".")
    return f"qkv:{parent}" if leaf in ("to_q", "to_k", "to_v") else ""


def _options(
    names: Sequence[str],
    table: SensitivityTable,
    candidates: Mapping[str, Sequence[int]],
    target: str,
    tie: bool,
    stored: Mapping[str, Mapping[int, float]] | None = None,
) -> list[LayerOptions]:
    return [
        LayerOptions(
            n,
            table.params[n],
            {b: -table.error(n, target, b) for b in candidates[n]},
            _qkv_tie(n) if tie else "",
            dict((stored or {}).get(n, {})),
        )
        for n in names
    ]


def _stored_bits_per_weight(
    base: Plan, candidates: Mapping[str, Sequence[int]], config: MixedConfig
) -> dict[str, dict[int, float]]:
    """layer -> candidate -> bits the budget charges per weight (``config.budget``).

    ``stored``: the bundle's bits per weight in the format the allocation would give the layer
    (:func:`_weight_spec`, :meth:`~diffkiln.core.plan.LayerPlan.stored_bits_as`);
    ``codes``: the width itself.
    """
    by_name = {lp.name: lp for lp in base.layers}
    if config.budget is WeightBudget.CODES:
        return {n: {b: float(b) for b in c} for n, c in candidates.items()}
    return {
        n: {
            b: by_name[n].stored_bits_as(None if b >= 16 else _weight_spec(b, config.group_size)) / by_name[n].params
            for b in c
        }
        for n, c in candidates.items()
    }


def _group_avgs(budget: float, groups: Mapping[str, list[LayerOptions]], config: MixedConfig) -> list[dict[str, float]]:
    """The per-group averages to try: the even split first, then content +/- k * split_step."""
    sizes = {g: sum(o.params for o in opts) for g, opts in groups.items() if opts}
    total = sum(sizes.values())
    even = budget / total
    if len(sizes) < 2:
        return [{g: even for g in sizes}]
    lo = {g: sum(o.params * min(map(o.bits, o.scores)) for o in groups[g]) / sizes[g] for g in sizes}
    hi = {g: sum(o.params * max(map(o.bits, o.scores)) for o in groups[g]) / sizes[g] for g in sizes}
    out: list[dict[str, float]] = []
    offsets = sorted(range(-config.splits, config.splits + 1), key=abs)
    for k in offsets:
        a_c = even + k * config.split_step
        a_q = (budget - a_c * sizes["content"]) / sizes["quality"]
        if lo["content"] - 1e-9 <= a_c and lo["quality"] - 1e-9 <= a_q:
            out.append({"content": min(a_c, hi["content"]), "quality": min(a_q, hi["quality"])})
        if len(out) == config.splits:
            break
    return out


def _group_latency_budgets(
    groups: Mapping[str, list[LayerOptions]], latency: LatencyTable | None, config: MixedConfig
) -> dict[str, float | None]:
    """Each group's share of the latency budget: its share of the summed latency at 8 bits."""
    if latency is None or config.latency_budget_ms is None:
        return dict.fromkeys(groups)
    ref = {g: sum(latency.ms.get(o.name, {}).get(8, 0.0) for o in opts) for g, opts in groups.items()}
    total = sum(ref.values()) or 1.0
    return {g: config.latency_budget_ms * ref[g] / total for g in groups}


def allocate_mixed(
    base: Plan,
    table: SensitivityTable,
    candidates: Mapping[str, Sequence[int]],
    config: MixedConfig,
    latency: LatencyTable | None = None,
) -> list[tuple[dict[str, float], dict[str, int], dict[str, int]]]:
    """The ILP allocations to measure: per budget split, (group averages, weight bits, act bits).

    Args:
        base: the W8A8 base plan (its FP layers are fixed at 16 bits).
        table: the measured sensitivities of every searched layer.
        candidates: layer -> weight candidates (16 included where allowed).
        config: budgets and candidates.
        latency: the measured per-layer latency table, needed for ``config.latency_budget_ms``.
            Default None.

    Raises:
        InfeasibleBudgetError: the weight (or activation) budget is below the smallest feasible
            average; the message names it.
    """
    total = sum(lp.params for lp in base.layers)
    fixed = [lp for lp in base.layers if lp.name not in candidates]
    managed = [lp.name for lp in base.layers if lp.name in candidates]
    stored = _stored_bits_per_weight(base, candidates, config)
    fixed_bits = 16 * sum(lp.params for lp in fixed)
    budget = config.weight_bits * total - fixed_bits
    least = sum(table.params[n] * min(stored[n].values()) for n in managed)
    floor = (fixed_bits + least) / total
    if budget < least - 1e-6:
        raise InfeasibleBudgetError(
            f"an average of {config.weight_bits} weight bits is infeasible: with the layers kept in FP and these "
            f"candidates the smallest feasible average is {floor:.3f}; raise --weight-bits or add lower candidates"
        )
    # Tied layers are solved in one program: all of them join the group of the first one.
    group_of: dict[str, LayerRole] = {}
    first_of_tie: dict[str, LayerRole] = {}
    for n in managed:
        tie = _qkv_tie(n) if config.tie_qkv else ""
        group_of[n] = first_of_tie.setdefault(tie, table.roles[n]) if tie else table.roles[n]
    groups = {
        role.value: _options(
            [n for n in managed if group_of[n] is role], table, candidates, "weight", config.tie_qkv, stored
        )
        for role in LayerRole
    }
    if config.latency_budget_ms is not None and latency is None:
        raise ValueError("a latency budget needs a measured latency table (diffkiln.optimizer.latency)")
    lat_budgets = _group_latency_budgets(groups, latency, config)
    costs: dict[str, dict[int, float]] | None = None
    if latency is not None:
        # A layer the sampler never calls costs nothing at any width.
        costs = {n: latency.ms.get(n) or dict.fromkeys(candidates[n], 0.0) for n in managed}
    results = []
    errors: list[str] = []
    for avgs in _group_avgs(budget, groups, config):
        wbits: dict[str, int] = {}
        try:
            for g, opts in groups.items():
                if opts:
                    wbits.update(allocate_bits(opts, avgs[g], costs=costs, cost_budget=lat_budgets[g]))
        except InfeasibleBudgetError as exc:
            errors.append(str(exc))
            continue  # ties or the latency bound can make a split infeasible; the others remain
        results.append((avgs, wbits, _allocate_acts(base, table, wbits, config)))
    uniform = _uniform_allocation(base, candidates, stored, config, latency) if config.uniform_candidate else None
    if uniform is not None and all(uniform[1] != w for _, w, _ in results):
        width, ubits = uniform
        results.append(({"uniform": float(width)}, ubits, _allocate_acts(base, table, ubits, config)))
    if not results:
        raise InfeasibleBudgetError(
            f"no split of {config.weight_bits} average weight bits between the content and quality layers is "
            f"feasible (smallest feasible average: {floor:.3f}); raise --weight-bits"
            + (f" or --latency-budget ({errors[0]})" if config.latency_budget_ms is not None and errors else "")
        )
    return results


def _uniform_allocation(
    base: Plan,
    candidates: Mapping[str, Sequence[int]],
    stored: Mapping[str, Mapping[int, float]],
    config: MixedConfig,
    latency: LatencyTable | None,
) -> tuple[int, dict[str, int]] | None:
    """(width, bits): every searched layer at the widest single width that fits the budgets, or None.

    Layers whose candidates lack that width (conditioning layers: 4, 8 or 16) take their nearest
    wider candidate. A uniform allocation more than one bit below the budget is no rival to the
    ILP's plans and is not returned.
    """
    total = sum(lp.params for lp in base.layers)
    for width in sorted({b for c in candidates.values() for b in c if b < 16}, reverse=True):
        bits = {n: min((b for b in c if b >= width), default=16) for n, c in candidates.items()}
        per_weight = {n: stored[n].get(b, float(b)) for n, b in bits.items()}
        avg = sum(lp.params * per_weight.get(lp.name, 16.0) for lp in base.layers) / total
        fits_latency = (
            config.latency_budget_ms is None or latency is None or latency.total(bits) <= config.latency_budget_ms
        )
        if avg <= config.weight_bits + 1e-9 and fits_latency:
            return (width, bits) if avg >= config.weight_bits - 1.0 else None
    return None


def _allocate_acts(
    base: Plan, table: SensitivityTable, wbits: Mapping[str, int], config: MixedConfig
) -> dict[str, int]:
    quantized = [n for n, b in wbits.items() if b < 16]
    with_grid = [n for n in quantized if any(e.layer == n and e.target == "act" for e in table.entries)]
    if config.act_bits is None:
        return {n: 8 if n in with_grid else 16 for n in quantized}
    total = sum(lp.params for lp in base.layers)
    fixed_bits = 16 * sum(lp.params for lp in base.layers if lp.name not in with_grid)
    budget = config.act_bits * total - fixed_bits
    opts = _options(with_grid, table, {n: config.act_candidates for n in with_grid}, "act", False)
    size = sum(o.params for o in opts)
    if not opts:
        return dict.fromkeys(quantized, 16)
    if budget < size * min(config.act_candidates) - 1e-6:
        floor = (fixed_bits + size * min(config.act_candidates)) / total
        raise InfeasibleBudgetError(
            f"an average of {config.act_bits} activation bits is infeasible: layers kept in FP count 16, so the "
            f"smallest feasible average is {floor:.3f}; raise --act-bits"
        )
    abits = allocate_bits(opts, budget / size)
    return {n: abits.get(n, 16) for n in quantized}


def _weight_spec(bits: int, group_size: int | None) -> WeightSpec:
    """Mixed precision's weights: float16 scales; 4-/2-bit ones grouped when asked."""
    return WeightSpec(bits=bits, scale_dtype="float16", group_size=group_size if bits in PACKABLE_BITS else None)


def _mixed_layers(
    base: Plan, wbits: Mapping[str, int], abits: Mapping[str, int], group_size: int | None = None
) -> tuple[LayerPlan, ...]:
    out = []
    for lp in base.layers:
        w = wbits.get(lp.name, 16)
        if w >= 16 or lp.weight is None:
            if lp.quantized:
                lp = dataclasses.replace(lp, weight=None, act=None, bos_positions=(), reason="kept in FP by the ILP",
                                         smooth_alpha=None)  # fmt: skip
            out.append(lp)
            continue
        act = lp.act if abits.get(lp.name, 16) < 16 else None
        out.append(
            dataclasses.replace(
                lp,
                weight=_weight_spec(w, group_size),
                act=act,
                smooth_alpha=lp.smooth_alpha if act is not None else None,
            )
        )
    return tuple(out)


def uniform_plan(base: Plan, weight_bits: int, act: bool = True, group_size: int | None = None) -> Plan:
    """Every layer the base plan quantizes at ``weight_bits`` (e.g. uniform W4A8), for comparison.

    Args:
        base: the W8A8 base plan.
        weight_bits: 2, 4 or 8.
        act: keep 8-bit activations (False: weight-only). Default True.
        group_size: two-level groups for 4-/2-bit weights. Default None (per channel).
    """
    wbits = {lp.name: weight_bits for lp in base.layers if lp.quantized}
    abits = {n: 8 if act else 16 for n in wbits}
    return dataclasses.replace(base, recipe=f"uniform-w{weight_bits}a{8 if act else 16}",
                               layers=_mixed_layers(base, wbits, abits, group_size))  # fmt: skip


def _measure_plan(
    pipe: Any, plan: Plan, stats: CalibrationStats, run: Callable[[Any], np.ndarray], ref: np.ndarray
) -> np.ndarray:
    """Per-prompt SSIM of the plan's final images against FP's, on the integer runtime."""
    from diffkiln.core.metrics import ssim
    from diffkiln.nn.freeze import apply_plan  # export reads plans; the optimizer only measures them

    qpipe = apply_plan(pipe, plan, stats)
    imgs = run(qpipe)
    del qpipe
    return np.array([ssim(r, t) for r, t in zip(ref, imgs, strict=True)], dtype=np.float64)


def select_candidate(per_prompt: Sequence[np.ndarray], confidence: float) -> int:
    """The index of the plan to keep, from each candidate's per-prompt SSIM (same prompts, in order).

    The first candidate (the split nearest the even one) stands unless the candidate with the best
    mean beats it by more than ``confidence`` standard errors of their paired per-prompt
    differences: a deliberate deviation from the even split must be measurably better, since a
    few prompts' SSIM does not track content (measured on shapes-dit, BENCHMARKS.md 2026-12-03).

    Args:
        per_prompt: one array per candidate.
        confidence: the margin in standard errors; 0 takes the best mean.

    Raises:
        ValueError: no candidates, or arrays of different lengths.
    """
    if not per_prompt or len({len(a) for a in per_prompt}) != 1:
        raise ValueError("need one per-prompt score array per candidate, all of the same length")
    best = int(np.argmax([float(np.mean(a)) for a in per_prompt]))
    diff = np.asarray(per_prompt[best], dtype=np.float64) - np.asarray(per_prompt[0], dtype=np.float64)
    se = float(np.std(diff, ddof=1) / np.sqrt(len(diff))) if len(diff) > 1 else 0.0
    return best if float(np.mean(diff)) > confidence * se else 0


def mixed_sensitivity(
    pipe: Any,
    stats: CalibrationStats,
    qconfig: QuantizeConfig,
    config: MixedConfig,
    sens_config: SensitivityConfig,
    source_id: str,
    target: str | None = None,
) -> tuple[Plan, SensitivityTable, dict[str, tuple[int, ...]]]:
    """Steps 1 and 2 of the search: the W8A8 base plan, and every searched layer's sensitivities.

    Args: as :func:`make_mixed_plan`.

    Returns:
        (base plan, sensitivity table, layer -> its weight candidates including 16 where allowed).
    """
    if qconfig.requantize_conv_outputs:
        # Requantized outputs pay off where the convolution itself is int8 (onnxruntime's
        # QLinearConv); the ILP's 4- and 2-bit convolutions are not, so it is not offered here.
        raise ValueError("requantize_conv_outputs applies to the w8a8 recipe, not mixed; leave it off")
    denoiser = find_denoiser(pipe)
    conditioning = [n for n, r in fp_default_reasons(denoiser).items() if r.startswith("conditioning")]
    # The base plan only lends its activation grids; every searched layer's weight spec (float16
    # scales) is set by the allocation, so the base keeps float32 scales and stable cache keys.
    base_cfg = dataclasses.replace(
        qconfig,
        include=(*qconfig.include, *conditioning),
        weight_bits=8,
        act_bits=8,
        timestep_aware=False,
        scale_dtype="float32",
    )
    base = make_plan(pipe, stats, base_cfg, source_id)
    roles = layer_roles(denoiser, config.content, config.quality)
    restricted = set(conditioning) - set(qconfig.include)
    candidates: dict[str, tuple[int, ...]] = {}
    for lp in base.layers:
        if lp.quantized:
            allowed = _RESTRICTED_CANDIDATES if lp.name in restricted else config.weight_candidates
            bits = tuple(b for b in config.weight_candidates if b in allowed)
            candidates[lp.name] = bits or (16,)
    sims = layer_sims(base, stats, denoiser)
    scored = dataclasses.replace(
        sens_config,
        weight_candidates=tuple(sorted({b for c in candidates.values() for b in c if b < 16})) or (8,),
        act_candidates=(8,),
    )
    table = analyze_sensitivity(
        pipe, stats, base, roles, sims, {n: [b for b in c if b < 16] for n, c in candidates.items()}, scored, target
    )
    return base, table, candidates


def make_mixed_plan(
    pipe: Any,
    stats: CalibrationStats,
    qconfig: QuantizeConfig,
    config: MixedConfig,
    sens_config: SensitivityConfig,
    source_id: str,
    target: str | None = None,
) -> MixedResult:
    """Search a mixed-precision plan (see the module docstring).

    Args:
        pipe: the FP pipeline (left unchanged).
        stats: its calibration statistics.
        qconfig: W8A8 settings of the base plan (exclude/include, BOS-aware, smoothing, clipping).
        config: budgets and candidates.
        sens_config: sensitivity measurement settings (prompts, workers, cache).
        source_id: the model's id, recorded in the plan.
        target: the model's name or folder, for sensitivity workers.

    Raises:
        InfeasibleBudgetError: the budget cannot be met; the message names the smallest feasible one.
    """
    from diffkiln.optimizer.sensitivity import _as_image_array

    base, table, candidates = mixed_sensitivity(pipe, stats, qconfig, config, sens_config, source_id, target)
    latency = (
        measure_layer_latency(pipe, base, stats, candidates, config.latency_device, group_size=config.group_size)
        if config.latency_budget_ms is not None
        else None
    )
    allocations = allocate_mixed(base, table, candidates, config, latency)

    settings = stats.settings
    run_kwargs = calibration_run_kwargs(settings, config.select_prompts)
    n = len(run_kwargs["prompt"])

    def run(p: Any) -> np.ndarray:
        p.set_progress_bar_config(disable=True)
        gens = [torch.Generator().manual_seed(int(settings.get("seed", 0)) + i) for i in range(n)]
        with torch.no_grad():
            return _as_image_array(p(**run_kwargs, generator=gens))

    ref = run(pipe)
    measured: list[dict[str, Any]] = []
    plans: list[Plan] = []
    scores: list[np.ndarray] = []
    for avgs, wbits, abits in allocations:
        layers = _mixed_layers(base, wbits, abits, config.group_size)
        plan = dataclasses.replace(base, recipe="mixed", layers=layers)
        scores.append(_measure_plan(pipe, plan, stats, run, ref))
        plans.append(plan)
        measured.append({
            "group_avg_bits": {g: round(a, 3) for g, a in avgs.items()},
            "avg_weight_bits": round(plan.avg_weight_bits, 3),
            "avg_stored_weight_bits": round(plan.avg_stored_weight_bits, 3),
            "avg_act_bits": round(plan.avg_act_bits, 3),
            "ssim": round(float(np.mean(scores[-1])), 5),
            "ssim_per_prompt": [round(float(v), 5) for v in scores[-1]],
        })  # fmt: skip
    chosen = select_candidate(scores, config.select_confidence)
    plan = plans[chosen]
    notes = {
        **base.notes,
        "recipe": "mixed",
        "mixed": {
            **{k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(config).items()},
            "candidates_measured": measured,
            "chosen": chosen,
            "selection": (
                f"mean SSIM of final images vs FP, integer runtime, {n} calibration prompts; the first "
                f"candidate unless the best beats it by > {config.select_confidence:g} paired standard errors"
            ),
            "sensitivity": {k: v for k, v in table.settings.items() if k != "format"},
        },
    }
    return MixedResult(dataclasses.replace(plan, notes=notes), table, measured, chosen)
