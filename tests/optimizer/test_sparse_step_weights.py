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


def test_a_second_round_corrects_the_first_rounds_weights() -> None:
    # The second round measures groups under masks solved with the first round's weights: its
    # factors are relative to those weights, so they multiply them.
    from diffkiln.optimizer.sparse_search import _step_weighted

    class Measure:
        denoiser = None

        def __init__(self, sqnrs: list[float]) -> None:
            self.sqnrs = iter(sqnrs)

        def sqnr_under(self, applied: object) -> float:
            return next(self.sqnrs)

    stats, config = _stats(), SparseConfig(density=0.4, groups=2)
    base = search_masks(stats, config)
    first, w1 = _step_weighted(Measure([10.0, 20.0]), stats, config, base, None, False)
    assert torch.allclose(w1, step_weights(base, [10.0, 20.0]))
    assert first.search["step_weights"] == [round(float(w), 4) for w in w1]
    second, w2 = _step_weighted(Measure([15.0, 15.0]), stats, config, first, w1, False)
    own = step_weights(first, [15.0, 15.0])
    assert torch.allclose(w2, own * w1 / (own * w1).mean()) and w2.mean().item() == pytest.approx(1.0)
    assert second.density <= 0.4 + 1e-9
    with pytest.raises(Exception, match="weight_rounds must be >= 0"):
        SparseConfig(weight_rounds=-1)
