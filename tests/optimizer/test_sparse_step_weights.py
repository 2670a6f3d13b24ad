"""Step weights of the mask search: one group's masks at a time, and weights that move density to
where the final latents pay least."""

from __future__ import annotations

import pytest
import torch

from diffkiln.calibrate.attention_stats import AttentionStats, LayerGeometry
from diffkiln.optimizer.sparse_search import SparseConfig, search_masks
from diffkiln.optimizer.sparse_step_weights import only_group, step_weights

GRID = {"frames": 8, "height": 4, "width": 4, "prefix": 0, "suffix": 0}  # a 16-token block is a frame


def _stats(steps: int = 4) -> AttentionStats:
    """One layer, two heads, every step alike: nearby frames matter most."""
    i, j = torch.arange(8)[:, None], torch.arange(8)[None]
    near = torch.exp(-(i - j).abs().float())
    m = (near / near.sum(1, keepdim=True)).expand(steps, 2, 8, 8).clone()
    layer = LayerGeometry("blocks.0.attn", 2, 128, 128)
    return AttentionStats(16, steps, 1, (layer,), {layer.name: m}, {layer.name: m * 10}, {layer.name: GRID})


def test_only_group_keeps_one_groups_masks_and_makes_the_rest_dense() -> None:
    plan = search_masks(_stats(), SparseConfig(density=0.4, groups=2))
    one = only_group(plan, 1)
    lm, orig = one.layers[0], plan.layers[0]
    assert lm.masks[1] == orig.masks[1] and lm.families[1] == orig.families[1]
    assert all(bool(lm.mask(0, h, 16).all()) for h in range(2)) and lm.families[0] == ("dense", "dense")
    with pytest.raises(IndexError, match="2 step groups"):
        only_group(plan, 2)


def test_weights_follow_final_error_per_planned_error_and_shift_the_density() -> None:
    stats = _stats()
    plan = search_masks(stats, SparseConfig(density=0.4, groups=2))
    errors = plan.search["group_errors"]
    assert len(errors) == 2 and min(errors) > 0
    # The first group's masks cost the final latents 10 dB more than the second's.
    weights = step_weights(plan, [10.0, 20.0])
    assert weights.mean().item() == pytest.approx(1.0)
    # Final error over planned error: 10x the second group's per unit of planned error.
    assert weights[0].item() == pytest.approx(10 * errors[1] / errors[0] * weights[3].item())
    assert weights[0] == weights[1] and weights[2] == weights[3]
    weighted = search_masks(stats, SparseConfig(density=0.4, groups=2), step_weights=weights)
    kept = [sum(float(lm.mask(g, h, 16).float().mean()) for lm in weighted.layers for h in range(2)) for g in (0, 1)]
    assert kept[0] > kept[1] and weighted.density <= 0.4 + 1e-9  # the early group keeps more blocks
    with pytest.raises(ValueError, match="one SQNR and one planned error per step group"):
        step_weights(plan, [10.0])
