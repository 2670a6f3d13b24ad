"""Error weights of the mask search: masks of one step group or depth group at a time, and weights
that move density to where the final latents pay least."""

from __future__ import annotations

import pytest
import torch

from diffkiln.calibrate.attention_stats import AttentionStats, LayerGeometry
from diffkiln.optimizer.sparse_error_weights import depth_groups, error_weights, only_masked
from diffkiln.optimizer.sparse_search import SparseConfig, search_masks

GRID = {"frames": 8, "height": 4, "width": 4, "prefix": 0, "suffix": 0}  # a 16-token block is a frame
NAMES = ("blocks.0.attn", "blocks.1.attn", "blocks.2.attn")


def _stats(steps: int = 4) -> AttentionStats:
    """Three layers, two heads, every step and layer alike: nearby frames matter most."""
    i, j = torch.arange(8)[:, None], torch.arange(8)[None]
    near = torch.exp(-(i - j).abs().float())
    m = (near / near.sum(1, keepdim=True)).expand(steps, 2, 8, 8).clone()
    layers = tuple(LayerGeometry(n, 2, 128, 128) for n in NAMES)
    return AttentionStats(16, steps, 1, layers, dict.fromkeys(NAMES, m), dict.fromkeys(NAMES, m * 10),
                          dict.fromkeys(NAMES, GRID))  # fmt: skip


def _kept(plan: object, layers: tuple[str, ...], group: int) -> float:
    return sum(float(lm.mask(group, h, 16).float().mean()) for lm in plan.layers if lm.layer in layers  # type: ignore[attr-defined]
               for h in range(2))  # fmt: skip


def test_only_masked_keeps_the_chosen_groups_and_layers_and_makes_the_rest_dense() -> None:
    plan = search_masks(_stats(), SparseConfig(density=0.4, groups=2))
    one = only_masked(plan, groups=(1,))
    for lm, orig in zip(one.layers, plan.layers, strict=True):
        assert lm.masks[1] == orig.masks[1] and lm.families[1] == orig.families[1]
        assert all(bool(lm.mask(0, h, 16).all()) for h in range(2)) and lm.families[0] == ("dense", "dense")
    deep = only_masked(plan, layers=(NAMES[2],))
    assert deep.layers[2] == plan.layers[2] and all(bool(deep.layers[0].mask(g, 0, 16).all()) for g in (0, 1))
    assert depth_groups(plan, 2) == [NAMES[:2], NAMES[2:]] and depth_groups(plan, 8) == [(n,) for n in NAMES]
    with pytest.raises(IndexError, match="2 step groups"):
        only_masked(plan, groups=(2,))
    with pytest.raises(KeyError, match="masks no layer"):
        only_masked(plan, layers=("blocks.9.attn",))


def test_weights_follow_final_error_per_planned_error_and_shift_the_density() -> None:
    stats = _stats()
    plan = search_masks(stats, SparseConfig(density=0.4, groups=2))
    errors, per_layer = plan.search["group_errors"], plan.search["layer_errors"]
    assert len(errors) == 2 and min(errors) > 0 and set(per_layer) == set(NAMES)
    assert sum(errors) == pytest.approx(sum(per_layer.values())) == pytest.approx(plan.search["planned_error"])
    # The first step group's masks cost the final latents 10 dB more than the second's; the last
    # layer's 10 dB less than the first two layers'.
    depth = depth_groups(plan, 2)
    weights = error_weights(plan, [10.0, 20.0], depth, [10.0, 20.0])
    assert torch.stack(list(weights.values())).mean().item() == pytest.approx(1.0)
    w = weights[NAMES[0]]
    assert w[0].item() == pytest.approx(10 * errors[1] / errors[0] * w[3].item())
    assert w[0] == w[1] and w[2] == w[3]
    first, last = (sum(per_layer[n] for n in d) for d in depth)
    assert (weights[NAMES[0]] / weights[NAMES[2]]).tolist() == pytest.approx([10 * last / first] * 4)
    weighted = search_masks(stats, SparseConfig(density=0.4, groups=2), error_weights=weights)
    assert weighted.density <= 0.4 + 1e-9
    assert _kept(weighted, NAMES, 0) > _kept(weighted, NAMES, 1)  # the early group keeps more blocks
    # ... and so do the first layers.
    assert sum(_kept(weighted, NAMES[:1], g) for g in (0, 1)) > sum(_kept(weighted, NAMES[2:], g) for g in (0, 1))
    with pytest.raises(ValueError, match="one SQNR and one planned error per step group"):
        error_weights(plan, [10.0])
    with pytest.raises(ValueError, match="one SQNR per depth group"):
        error_weights(plan, [10.0, 20.0], depth, [10.0])
