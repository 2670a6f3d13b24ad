"""How much an attention error at each step and layer moves the final latents, measured.

The mask search adds up calibrated attention-output errors as if an error at step 3 cost what one
at step 18 costs, and one in the first layer what one in the last costs. They do not: an early
error is carried through every later step, a late one is nearly the output. Sampling with only one
step group's masks (the others dense) measures that group's share of the final latent error;
divided by the group's planned (calibrated) error it gives the factor that turns calibrated error
into final error at those steps. The same with one depth group of layers at a time (consecutive
masked layers, at most ``depth_groups`` of them, so a 30-block model costs as few samplings as a
4-block one). A layer's weight at a step is the product of its depth group's factor and the step
group's (a separable estimate: validation judges the result). The search solved again with its
errors so weighted spends its density where it costs the final latents least.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import torch

from diffkiln.core.sparse_plan import SparsePlan, pack_mask

__all__ = ["depth_groups", "error_weights", "only_masked"]


def depth_groups(plan: SparsePlan, at_most: int = 4) -> list[tuple[str, ...]]:
    """The plan's masked layers, in call order, cut into at most ``at_most`` consecutive groups of
    near-equal size."""
    names = [lm.layer for lm in plan.layers]
    size = math.ceil(len(names) / max(1, at_most)) if names else 1
    return [tuple(names[i : i + size]) for i in range(0, len(names), size)]


def only_masked(
    plan: SparsePlan, groups: Sequence[int] | None = None, layers: Sequence[str] | None = None
) -> SparsePlan:
    """``plan`` with only the step ``groups`` of the ``layers`` masked (None: all), the rest dense.

    Raises:
        IndexError: a step group the plan does not have.
        KeyError: a layer the plan does not mask.
    """
    keep_groups = set(range(len(plan.group_starts)) if groups is None else groups)
    if not keep_groups <= set(range(len(plan.group_starts))):
        raise IndexError(f"the plan has {len(plan.group_starts)} step groups, not {sorted(keep_groups)}")
    keep_layers = {lm.layer for lm in plan.layers} if layers is None else set(layers)
    unknown = keep_layers - {lm.layer for lm in plan.layers}
    if unknown:
        raise KeyError(f"the plan masks no layer {sorted(unknown)[:3]}")
    out = []
    for lm in plan.layers:
        q_blocks, kv_blocks = lm.blocks(plan.block)
        dense = pack_mask(torch.ones(q_blocks, kv_blocks, dtype=torch.bool))
        masked = [lm.layer in keep_layers and g in keep_groups for g in range(len(lm.masks))]
        masks = tuple(m if k else (dense,) * lm.heads for m, k in zip(lm.masks, masked, strict=True))
        families = tuple(f if k else ("dense",) * lm.heads for f, k in zip(lm.families, masked, strict=True))
        out.append(dataclasses.replace(lm, masks=masks, families=families))
    return dataclasses.replace(plan, layers=tuple(out))


def _factors(final_sqnr_db: Sequence[float], planned: Sequence[float]) -> list[float]:
    """Final error energy per unit of planned error; a part planned without error (all dense)
    gets the mean of the others (1 when none has one)."""
    raw = [10 ** (-db / 10) / err if err > 0 else None for db, err in zip(final_sqnr_db, planned, strict=True)]
    known = [f for f in raw if f is not None]
    mean = sum(known) / len(known) if known else 1.0
    return [mean if f is None else f for f in raw]


def error_weights(
    plan: SparsePlan,
    group_sqnr_db: Sequence[float],
    depth: Sequence[tuple[str, ...]] = (),
    depth_sqnr_db: Sequence[float] = (),
) -> dict[str, torch.Tensor]:
    """Per masked layer, ``(steps,)`` factors on its calibrated errors (mean 1 over layers and steps).

    Args:
        plan: the masks measured; its ``search`` holds the planned errors per step group
            (``group_errors``) and per layer (``layer_errors``).
        group_sqnr_db: per step group, the final-latent SQNR with only that group masked
            (:func:`only_masked`).
        depth: the depth groups measured (:func:`depth_groups`); empty: no depth factor.
        depth_sqnr_db: per depth group, the final-latent SQNR with only its layers masked.

    Raises:
        ValueError: not one SQNR per step group or depth group, or a plan without its planned errors.
    """
    group_errors, layer_errors = plan.search.get("group_errors"), plan.search.get("layer_errors")
    starts = list(plan.group_starts)
    if group_errors is None or len(group_errors) != len(starts) or len(group_sqnr_db) != len(starts):
        raise ValueError(f"need one SQNR and one planned error per step group ({len(starts)})")
    if len(depth) != len(depth_sqnr_db) or (depth and layer_errors is None):
        raise ValueError("need one SQNR per depth group, and the plan's planned error per layer")
    ends = [*starts[1:], plan.steps]
    per_step = torch.empty(plan.steps, dtype=torch.float64)
    for s, e, f in zip(starts, ends, _factors(group_sqnr_db, group_errors), strict=True):
        per_step[s:e] = f
    per_layer = dict.fromkeys((lm.layer for lm in plan.layers), 1.0)
    if depth:
        planned = [sum(layer_errors[n] for n in names) for names in depth]  # type: ignore[index]
        for names, f in zip(depth, _factors(depth_sqnr_db, planned), strict=True):
            per_layer.update(dict.fromkeys(names, f))
    weights = {name: per_step * f for name, f in per_layer.items()}
    mean = torch.stack(list(weights.values())).mean() if weights else torch.tensor(1.0)
    return {name: w / mean for name, w in weights.items()}
