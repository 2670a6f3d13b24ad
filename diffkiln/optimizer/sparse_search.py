"""Search block masks for every long attention layer, per step group and head, under a density
budget, from calibrated drop errors.

1. **Candidates** per (layer, step group, head) (:mod:`diffkiln.optimizer.attention_masks`): dense,
   spatial, temporal, local 3-D windows, and top-k of the group's mean calibrated mass at several
   densities; text blocks and a sink are always kept.
2. **Cost and error.** A candidate's cost is the attention FLOPs it keeps over the group's calls
   (kept token pairs x head width x calls). Its error is the calibrated error of dropping its
   blocks, summed over the dropped blocks of each query block (dropping blocks one at a time adds
   up; this is the additive approximation the search optimizes), averaged over query blocks and
   summed over the group's steps. With a cache schedule in the build, only the steps where the
   layer runs count (a reusing step skips the attention inside its reused blocks): the budget is
   spent where attention runs, and the planned density is the one the runtime measures.
3. **Allocation.** One candidate per (layer, step group, head), the total cost at most ``density``
   times dense, the total error least: a multiple-choice knapsack, solved by the greedy on its
   linear relaxation (:mod:`diffkiln.optimizer.choice_knapsack`), which also bounds how far from
   the optimum the answer may be (``search["error_lower_bound"]``).
4. **Validation** (:func:`search_sparse`, with a pipeline): the answers of several proposals
   (family subsets, finer step groups, and the errors weighted by what each step group's masks
   cost the final latents, at two step-group counts: :mod:`diffkiln.optimizer.sparse_step_weights`)
   are each sampled on calibration inputs outside the batch the attention statistics came from
   (where the calibration has enough), from initial noise the calibration did not use, and scored
   by the worst sample's SQNR over scales (:func:`diffkiln.optimizer.cache_validate.worst_sample_sqnr`:
   a pooled SQNR misses a colour drift in a few samples); the best scored is kept. With a cache
   schedule in the same build, the proposals are sampled under that schedule too, against the
   dense, uncached run: the masks kept are those that lose least where blocks really compute.

The density is over the attention calls of the recorded layers (long, unmasked attention); short
attention (e.g. cross-attention to the text) is not counted and runs dense.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from tqdm.auto import tqdm

from diffkiln.calibrate.attention_stats import AttentionStats
from diffkiln.calibrate.sources import source_from_description
from diffkiln.calibrate.stats import CalibrationStats
from diffkiln.core.cache_schedule import CacheSchedule
from diffkiln.core.configs import config_to_dict
from diffkiln.core.distributed import sharded_map
from diffkiln.core.errors import InvalidInputError
from diffkiln.core.plan import Plan
from diffkiln.core.sparse_plan import LayerMasks, SparsePlan, pack_mask
from diffkiln.kernels.sparse_attention import BlockLayout
from diffkiln.optimizer.attention_masks import MaskFamily, TokenGrid, family_mask, topk_mask
from diffkiln.optimizer.choice_knapsack import choose_within_budget
from diffkiln.optimizer.float_layers import float_layer_plans
from diffkiln.optimizer.registry import SearchContext, register_recipe
from diffkiln.optimizer.sparse_step_weights import only_group
from diffkiln.optimizer.sparse_step_weights import step_weights as measured_step_weights

__all__ = ["SparseConfig", "search_masks", "validation_samples"]


@dataclass(frozen=True)
class SparseConfig:
    """How to search sparse-attention masks.

    Attributes:
        density: the budget: kept attention FLOPs over dense, in (0, 1]. Default 0.35.
        groups: step groups of equal length (each gets its own masks). Default 4 (docs/sparse-attention.md
            compares group counts).
        windows: the ``local`` family's windows, (frames, rows, columns) gaps in tokens.
        topk: the ``topk`` family's densities.
        validate_samples: calibration inputs each proposal is sampled on (the worst sample's latent
            SQNR against dense attention, over scales), from initial noise the calibration did not
            use, and outside the first calibration batch, whose runs the attention statistics recorded, where the
            calibration has enough inputs (:func:`validation_samples`); the best measured proposal
            is kept. 0 keeps the first proposal's masks unvalidated. Default 4.
        block: tokens per mask block; calibration records its statistics at this size. 64 suits the
            CPU kernel; 128 is the one size MindIE-SD's sparse attention takes. Default 64.
    """

    density: float = 0.35
    groups: int = 4
    windows: tuple[tuple[int, int, int], ...] = ((0, 1, 1), (1, 1, 1), (1, 2, 2), (2, 3, 3), (4, 4, 4))
    topk: tuple[float, ...] = (0.1, 0.2, 0.35, 0.5)
    validate_samples: int = 4
    block: int = 64

    def __post_init__(self) -> None:
        if self.block < 16 or self.block & (self.block - 1):
            raise InvalidInputError(f"the attention block must be a power of two >= 16, got {self.block}")
        if not 0 < self.density <= 1:
            raise InvalidInputError(f"the attention density must be in (0, 1], got {self.density}")
        if self.groups <= 0:
            raise InvalidInputError(f"groups must be a positive integer, got {self.groups}")
        if self.validate_samples < 0:
            raise InvalidInputError(f"validate_samples must be >= 0, got {self.validate_samples}")


@dataclass(frozen=True)
class _Candidate:
    label: str
    mask: torch.Tensor
    cost: float
    error: float


def _candidates(stats: AttentionStats, grid: TokenGrid, layer: str, head: int, steps: range,
                config: SparseConfig, call_cost: float, step_weights: torch.Tensor,
                runs: torch.Tensor) -> list[_Candidate]:  # fmt: skip
    """The unit's candidate masks, each with its cost (kept FLOPs over the steps where the layer runs,
    ``runs``) and its calibrated error over those steps, weighted by ``step_weights``."""
    geometry = next(g for g in stats.layers if g.name == layer)
    block = stats.block
    masks: dict[str, torch.Tensor] = {"dense": family_mask(grid, block, MaskFamily.DENSE)}
    masks["spatial"] = family_mask(grid, block, MaskFamily.SPATIAL)
    masks["temporal"] = family_mask(grid, block, MaskFamily.TEMPORAL)
    for w in config.windows:
        masks[f"local({w[0]},{w[1]},{w[2]})"] = family_mask(grid, block, MaskFamily.LOCAL, w)
    mean_mass = stats.mass[layer][steps.start : steps.stop, head].mean(0)
    for d in config.topk:
        masks[f"topk({d})"] = topk_mask(mean_mass, grid, block, d)
    drop = stats.drop_error[layer][steps.start : steps.stop, head]  # (group steps, qb, kb)
    weights = step_weights[steps.start : steps.stop] * runs[steps.start : steps.stop]
    drop = drop * weights[:, None, None].to(drop.dtype)
    run_steps = float(runs[steps.start : steps.stop].sum())
    out, seen = [], set()
    for label, mask in masks.items():
        key = pack_mask(mask)
        if key in seen:
            continue  # another family gave the same mask
        seen.add(key)
        dropped = drop[:, ~mask]
        if bool(torch.isinf(dropped).any()):
            continue  # it drops all of some query's mass
        error = float(torch.where(~mask, drop, torch.zeros_like(drop)).sum(-1).mean(-1).sum())
        density = BlockLayout.from_mask(mask[None], geometry.q_len, geometry.kv_len, block).density
        out.append(_Candidate(label, mask, density * call_cost * run_steps, error))
    return out


def _nothing_to_mask(stats: AttentionStats) -> str:
    """Why no attention layer was recorded, and what to change."""
    if stats.left_dense is None:  # statistics cached before the left-dense layers were recorded
        return (f"the calibration recorded no attention layer with at least two key blocks of {stats.block} tokens, "
                "no attention mask and no causal mask; nothing to make sparse")  # fmt: skip
    if not stats.left_dense:
        return ("calibration saw no attention call it could intercept (scaled_dot_product_attention inside the "
                "denoiser); nothing to make sparse")  # fmt: skip
    why = {"short": f"fewer key tokens than two blocks of {stats.block}", "mask": "an attention mask",
           "causal": "causal attention"}  # fmt: skip
    name, (reason, keys) = next(iter(stats.left_dense.items()))
    text = (
        f"no attention layer can take block masks: calibration left all {len(stats.left_dense)} dense "
        f"(e.g. {name}: {why.get(reason, reason)}, {keys} key tokens)"
    )
    short = [keys for reason, keys in stats.left_dense.values() if reason == "short"]
    if short:
        longest = max(short)
        text += (f"; the longest had {longest} key tokens: calibrate at the resolution and frame count you deploy "
                 "(--call-arg height=H --call-arg width=W ...)")  # fmt: skip
        block = 1 << max(0, (longest // 2).bit_length() - 1)  # the largest power of two giving two blocks
        if 16 <= block < stats.block:
            text += f", or use smaller blocks (--attn-block {block}; the GPU and NPU kernels run blocks of 128)"
    return text


def search_masks(
    stats: AttentionStats,
    config: SparseConfig,
    grids: dict[str, dict[str, int]] | None = None,
    step_weights: torch.Tensor | None = None,
    schedule: CacheSchedule | None = None,
) -> SparsePlan:
    """Masks of small calibrated error within the density budget (see the module docstring).

    Args:
        stats: the calibrated block statistics (``CalibrationConfig.attention_stats``).
        config: the budget and the candidates.
        grids: each recorded layer's token layout; None: the ones calibration found (``stats.grids``).
        step_weights: ``(steps,)`` factors on each step's calibrated errors (how much an attention
            error at that step moves the final latents:
            :func:`diffkiln.optimizer.sparse_step_weights.step_weights`); None: all 1.
        schedule: the build's cache schedule: a layer's calls on the steps where it does not run
            (inside the blocks a reusing step skips) count neither in the budget nor in the error, so
            the budget is spent where attention runs and the density is the one the runtime
            measures; None: every step runs every layer.

    Raises:
        InvalidInputError: no recorded layer, a layer without a grid, a budget below what the
            sparsest candidates reach, or step weights or a schedule of another length than the
            steps.
    """
    grids = stats.grids if grids is None else grids
    if not stats.layers:
        raise InvalidInputError(_nothing_to_mask(stats))
    missing = [g.name for g in stats.layers if g.name not in grids]
    if missing:
        raise InvalidInputError(f"no token grid for attention layer(s) {missing[:3]}")
    weights = torch.ones(stats.steps) if step_weights is None else step_weights.double()
    if tuple(weights.shape) != (stats.steps,):
        raise InvalidInputError(f"step weights must be one per step ({stats.steps}), got shape {tuple(weights.shape)}")
    if schedule is not None and schedule.steps != stats.steps:
        raise InvalidInputError(f"the cache schedule has {schedule.steps} steps and the attention statistics "
                                f"{stats.steps}; search both from one calibration")  # fmt: skip
    size = math.ceil(stats.steps / config.groups)
    starts = tuple(range(0, stats.steps, size))
    units: dict[tuple[str, int, int], list[_Candidate]] = {}
    total = 0.0
    for g in stats.layers:
        grid = TokenGrid(**grids[g.name])
        if grid.tokens != g.q_len or g.q_len != g.kv_len:
            continue  # masks are for self-attention over the layer's own token grid
        call_cost = float(g.q_len * g.kv_len * stats.calls_per_step)
        runs = torch.tensor(schedule.runs_at(g.name) if schedule is not None else (True,) * stats.steps).double()
        for gi, s in enumerate(starts):
            steps = range(s, min(s + size, stats.steps))
            for h in range(g.heads):
                units[(g.name, gi, h)] = _candidates(stats, grid, g.name, h, steps, config, call_cost, weights, runs)
                total += call_cost * float(runs[steps.start : steps.stop].sum())
    if not units:
        raise InvalidInputError("no recorded attention layer attends over its own token grid; nothing to make sparse")
    keys = list(units)
    try:
        answer = choose_within_budget([[c.cost for c in units[u]] for u in keys],
                                      [[c.error for c in units[u]] for u in keys], config.density * total)  # fmt: skip
    except ValueError:
        least = sum(min(c.cost for c in cands) for cands in units.values()) / total
        raise InvalidInputError(f"no masks reach density {config.density}: the sparsest candidates keep {least:.3f}; "
                                "ask for a higher --attn-density") from None  # fmt: skip
    chosen = {u: units[u][k] for u, k in zip(keys, answer.picks, strict=True)}
    return _plan(stats, grids, config, starts, chosen, total, answer.lower_bound)


def _plan(stats: AttentionStats, grids: dict[str, dict[str, int]], config: SparseConfig, starts: tuple[int, ...],
          chosen: dict[tuple[str, int, int], _Candidate], total: float, lower_bound: float) -> SparsePlan:  # fmt: skip
    layers = []
    for g in stats.layers:
        if (g.name, 0, 0) not in chosen:
            continue
        groups = range(len(starts))
        families = tuple(tuple(chosen[(g.name, gi, h)].label for h in range(g.heads)) for gi in groups)
        masks = tuple(tuple(pack_mask(chosen[(g.name, gi, h)].mask) for h in range(g.heads)) for gi in groups)
        layers.append(LayerMasks(g.name, g.heads, g.q_len, g.kv_len, dict(grids[g.name]), families, masks))
    kept = sum(c.cost for c in chosen.values())
    search: dict[str, Any] = {
        "units": len(chosen),
        "planned_error": sum(c.error for c in chosen.values()),
        "error_lower_bound": lower_bound,
        "group_errors": [sum(c.error for (_, gi, _), c in chosen.items() if gi == g) for g in range(len(starts))],
        "families": sorted({c.label for c in chosen.values()}),
    }
    return SparsePlan(stats.block, stats.steps, stats.calls_per_step, starts, tuple(layers), kept / total,
                      config.density, search)  # fmt: skip


def _proposals(config: SparseConfig) -> list[tuple[str, SparseConfig]]:
    """The search's proposals: every family, no top-k, no local windows, twice the step groups
    (finer groups follow the steps' changing attention; the calibrated errors do not say what they
    cost in the final latents, so validation decides)."""
    return [
        ("all families", config),
        ("geometric families", dataclasses.replace(config, topk=())),
        ("no local windows", dataclasses.replace(config, windows=())),
        ("twice the step groups", dataclasses.replace(config, groups=2 * config.groups)),
    ]


def search_sparse(model: Any, stats: CalibrationStats, config: SparseConfig, progress: bool = False,
                  schedule: CacheSchedule | None = None) -> SparsePlan:  # fmt: skip
    """Masks for ``model``: the knapsack's answer for each proposal (:func:`_proposals`) and, when
    validating, for the full family set with its errors weighted by step (:func:`_step_weighted`)
    at ``config.groups`` and one more step group, each sampled on ``config.validate_samples``
    calibration inputs (:func:`validation_samples`) from fresh noise (the worst sample's latent
    SQNR against dense attention, over scales); the best scored is kept (without validation, the
    first proposal's). ``progress`` shows bars over the samplings. ``schedule``: the build's cache
    schedule, under which the proposals are validated (the reference stays dense and uncached).

    Raises:
        InvalidInputError: no attention statistics, or no proposal reaches the budget.
    """
    from diffkiln.optimizer.cache_validate import LatentRun

    if stats.attention is None:
        raise InvalidInputError("the calibration statistics hold no attention statistics; calibrate with "
                                "attention_stats=True")  # fmt: skip
    if stats.attention.block != config.block:
        raise InvalidInputError(
            f"the attention statistics are in blocks of {stats.attention.block} tokens and the search asks for "
            f"{config.block}; calibrate with attention_block={config.block}"
        )
    t0 = time.perf_counter()
    attention = stats.attention

    def solve(candidate: tuple[str, SparseConfig]) -> SparsePlan | None:
        try:
            return search_masks(attention, candidate[1], schedule=schedule)
        except InvalidInputError:
            return None  # this family subset cannot reach the budget

    # Each rank solves its share of the proposals' knapsacks (one process: all of them).
    proposals = list(_proposals(config))
    solved = sharded_map(solve, proposals)
    plans = [(label, plan) for (label, _), plan in zip(proposals, solved, strict=True) if plan is not None]
    if not plans:
        search_masks(stats.attention, config, schedule=schedule)  # raises with the least reachable density
    rows: list[dict[str, Any]] = []
    window: dict[str, int] = {}
    best = plans[0]
    if config.validate_samples and not isinstance(model, torch.nn.Module):
        # Other inputs and fresh noise: the masks were fitted to the first batch's attention, and
        # scoring them on those runs rewards the overfit (top-k masks that follow where these
        # samples' content lay), even from other noise.
        window = validation_samples(stats, config.validate_samples)
        measure = LatentRun(model, stats, config.validate_samples, fresh_noise=True, first=window["first"])
        if plans[0][0] == _proposals(config)[0][0]:  # weigh the full family set's answer when it fits the budget
            plans.append(("errors weighted by step", _step_weighted(measure, attention, config, plans[0][1], progress,
                                                                    schedule)))  # fmt: skip
            # Where the group boundaries fall against the few first steps that carry most of the
            # final error moves the weighted answer by a dB or more; a second count lets the
            # validation choose (docs/sparse-attention.md).
            more = dataclasses.replace(config, groups=config.groups + 1)
            base = solve(("", more))
            if base is not None:
                label = f"errors weighted by step, {more.groups} step groups"
                plans.append((label, _step_weighted(measure, attention, more, base, progress, schedule)))
        bar = functools.partial(tqdm, desc="sparse search: validating masks", unit="mask set", disable=not progress)

        def validate(candidate: tuple[str, SparsePlan]) -> float:
            # Under the build's cache schedule, if any: the masks that lose least where blocks
            # really compute, against the dense, uncached run.
            return measure.worst_sqnr_under(functools.partial(_masks_applied, measure, candidate[1], schedule))

        # Each rank validates its share of the proposals (one process: all of them).
        scores = sharded_map(validate, plans, bar)
        for (label, plan), score in zip(plans, scores, strict=True):
            rows.append({"proposal": label, "density": round(plan.density, 4), "sqnr_db": round(score, 3),
                         "planned_error": round(plan.search["planned_error"], 4)})  # fmt: skip
        best = plans[max(range(len(plans)), key=lambda i: scores[i])]
    search = {**best[1].search, "proposal": best[0], "validated": rows, "validation_samples": window,
              "metric": "the worst sample's SQNR (dB) of the final latents against dense attention, averaged "
                        "over scales (cache_validate.worst_sample_sqnr)",
              "under_cache_schedule": None if schedule is None else schedule.pattern,
              "seconds": round(time.perf_counter() - t0, 2)}  # fmt: skip
    return dataclasses.replace(best[1], search=search)


def validation_samples(stats: CalibrationStats, samples: int) -> dict[str, int]:
    """Which calibration inputs validation samples: ``samples`` of them, the first outside the
    first calibration batch (whose runs the attention statistics recorded) when the calibration has
    enough inputs, else the last ``samples`` (as many outside that batch as there are).

    Returns:
        ``first`` (the first sample's index), ``samples`` (how many) and ``unseen`` (how many of
        them the attention statistics did not see).
    """
    total = len(source_from_description(stats.settings["source"], files=True))
    batch = min(int(stats.settings.get("batch_size", total)), total)
    first = max(0, min(batch, total - samples))
    count = min(samples, total - first)
    return {"first": first, "samples": count, "unseen": max(0, first + count - batch)}


@contextlib.contextmanager
def _masks_applied(measure: Any, masks: SparsePlan, schedule: CacheSchedule | None = None) -> Iterator[None]:
    """``masks`` on ``measure``'s denoiser, under ``schedule`` where one is given (the cache's hooks
    outside the masks', in the order the runtime applies them)."""
    from diffkiln.nn.cache import cache_schedule_applied
    from diffkiln.nn.sparse_attention import sparse_plan_applied

    with contextlib.ExitStack() as stack:
        if schedule is not None:
            scheduler = getattr(measure.pipe, "scheduler", None)
            stack.enter_context(cache_schedule_applied(measure.denoiser, schedule, scheduler))
        stack.enter_context(sparse_plan_applied(measure.denoiser, masks))
        yield


def _step_weighted(measure: Any, attention: AttentionStats, config: SparseConfig, base: SparsePlan,
                   progress: bool, schedule: CacheSchedule | None = None) -> SparsePlan:  # fmt: skip
    """``config``'s masks solved again with each step's errors weighted by what its step group's
    masks in ``base`` cost the final latents (:mod:`diffkiln.optimizer.sparse_step_weights`). Each
    group is sampled without a cache schedule: a schedule's own error would set a floor under every
    group's SQNR and flatten the weights."""
    bar = functools.partial(tqdm, desc="sparse search: weighing step groups", unit="group", disable=not progress)

    def group_sqnr(group: int) -> float:
        return float(measure.sqnr_under(functools.partial(_masks_applied, measure, only_group(base, group))))

    # Each rank samples its share of the groups (one process: all of them).
    measured = sharded_map(group_sqnr, list(range(len(base.group_starts))), bar)
    weights = measured_step_weights(base, measured)
    plan = search_masks(attention, config, step_weights=weights, schedule=schedule)  # base's costs: it fits
    search = {**plan.search, "group_sqnr_db": [round(x, 3) for x in measured],
              "step_weights": [round(float(w), 4) for w in weights]}  # fmt: skip
    return dataclasses.replace(plan, search=search)


def plan_sparse(model: Any, stats: CalibrationStats, config: SparseConfig, context: SearchContext) -> Plan:
    """The ``sparse`` recipe: every layer kept in floating point, and searched sparse-attention masks."""
    if stats.attention is None:
        raise InvalidInputError("the calibration statistics hold no attention statistics; calibrate with "
                                "attention_stats=True")  # fmt: skip
    return Plan(
        recipe="sparse",
        source={"id": context.source_id, "weight_hash": stats.model_hash},
        layers=float_layer_plans(model, stats, "the sparse recipe keeps float weights"),
        notes={"recipe_config": config_to_dict(config), "calibration": stats.settings},
        denoiser=stats.denoiser,
        sparse=search_sparse(model, stats, config, context.progress, context.cache_schedule),
    )


register_recipe("sparse", SparseConfig)(plan_sparse)
