"""How much an attention error at each step group moves the final latents, measured.

The mask search adds up calibrated attention-output errors over the steps as if an error at step 3
cost what one at step 18 costs. It does not: an early error is carried through every later step,
a late one is nearly the output. Sampling with one step group's masks at a time (the others dense)
measures each group's share of the final latent error; divided by that group's planned (calibrated)
error it gives the factor that turns calibrated error into final error at those steps. The search
solved again with its errors weighted so spends its density where it costs the final latents least.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch

from diffkiln.core.sparse_plan import SparsePlan, pack_mask

__all__ = ["only_group", "step_weights"]


def only_group(plan: SparsePlan, group: int) -> SparsePlan:
    """``plan`` with every step group but ``group`` run dense.

    Raises:
        IndexError: no such step group.
    """
    if not 0 <= group < len(plan.group_starts):
        raise IndexError(f"the plan has {len(plan.group_starts)} step groups, not a group {group}")
    layers = []
    for lm in plan.layers:
        q_blocks, kv_blocks = lm.blocks(plan.block)
        dense = pack_mask(torch.ones(q_blocks, kv_blocks, dtype=torch.bool))
        masks = tuple(m if g == group else (dense,) * lm.heads for g, m in enumerate(lm.masks))
        families = tuple(f if g == group else ("dense",) * lm.heads for g, f in enumerate(lm.families))
        layers.append(dataclasses.replace(lm, masks=masks, families=families))
    return dataclasses.replace(plan, layers=tuple(layers))


def step_weights(plan: SparsePlan, final_sqnr_db: Sequence[float]) -> torch.Tensor:
    """``(steps,)`` factors on the calibrated errors, from each step group's measured final-latent
    SQNR with only that group masked (``final_sqnr_db[g]``, :func:`only_group`) over the group's
    planned error (``plan.search["group_errors"]``); their mean over the steps is 1. A group
    planned without error (all dense) keeps the mean factor.

    Raises:
        ValueError: not one SQNR per step group, or a plan without its per-group planned errors.
    """
    planned = plan.search.get("group_errors")
    starts = list(plan.group_starts)
    if planned is None or len(planned) != len(starts) or len(final_sqnr_db) != len(starts):
        raise ValueError(f"need one SQNR and one planned error per step group ({len(starts)})")
    factors: list[float | None] = [
        10 ** (-db / 10) / err if err > 0 else None for db, err in zip(final_sqnr_db, planned, strict=True)
    ]
    known = [f for f in factors if f is not None]
    mean = sum(known) / len(known) if known else 1.0
    ends = [*starts[1:], plan.steps]
    weights = torch.empty(plan.steps, dtype=torch.float64)
    for s, e, f in zip(starts, ends, factors, strict=True):
        weights[s:e] = mean if f is None else f
    return weights / weights.mean()
