"""ILP bit allocation: optimal against brute force, budgets and ties respected, clear infeasibility."""

from __future__ import annotations

import itertools
import random

import pytest

from diffkiln.optimizer.allocation import InfeasibleBudgetError, LayerOptions, allocate_bits, min_feasible_avg_bits


def _random_layers(seed: int, n: int, cands: tuple[int, ...] = (2, 4, 8)) -> list[LayerOptions]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        # Scores rise with bits (less error), with layer-specific sensitivity.
        sens = rng.uniform(0.1, 5.0)
        out.append(
            LayerOptions(f"l{i}", rng.randint(10, 1000), {b: -sens / b**2 + rng.uniform(0, 0.01) for b in cands})
        )
    return out


def _brute_force(layers: list[LayerOptions], avg: float) -> float:
    total = sum(lo.params for lo in layers)
    best = float("-inf")
    for combo in itertools.product(*[sorted(lo.scores) for lo in layers]):
        if any(
            lo.tie and combo[i] != combo[j]
            for i, lo in enumerate(layers)
            for j, other in enumerate(layers)
            if lo.tie and lo.tie == other.tie
        ):
            continue
        if sum(lo.params * b for lo, b in zip(layers, combo, strict=True)) <= avg * total + 1e-9:
            best = max(best, sum(lo.scores[b] for lo, b in zip(layers, combo, strict=True)))
    return best


def _score(layers: list[LayerOptions], choice: dict[str, int]) -> float:
    return sum(lo.scores[choice[lo.name]] for lo in layers)


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("avg", [3.0, 4.0, 6.0])
def test_ilp_matches_brute_force_and_respects_the_budget(seed: int, avg: float) -> None:
    layers = _random_layers(seed, 6)
    choice = allocate_bits(layers, avg)
    total = sum(lo.params for lo in layers)
    assert sum(lo.params * choice[lo.name] for lo in layers) <= avg * total + 1e-9
    assert _score(layers, choice) == pytest.approx(_brute_force(layers, avg), abs=1e-9)


def test_tied_layers_share_a_width_and_stay_optimal() -> None:
    layers = _random_layers(3, 5)
    layers[1] = LayerOptions(layers[1].name, layers[1].params, layers[1].scores, tie="qkv")
    layers[3] = LayerOptions(layers[3].name, layers[3].params, layers[3].scores, tie="qkv")
    choice = allocate_bits(layers, 4.0)
    assert choice["l1"] == choice["l3"]
    assert _score(layers, choice) == pytest.approx(_brute_force(layers, 4.0), abs=1e-9)


def test_an_infeasible_budget_names_the_smallest_feasible_average() -> None:
    layers = [LayerOptions("a", 100, {4: 0.0, 8: 1.0}), LayerOptions("b", 300, {2: 0.0, 8: 1.0})]
    floor = min_feasible_avg_bits(layers)
    assert floor == pytest.approx((100 * 4 + 300 * 2) / 400)
    with pytest.raises(InfeasibleBudgetError, match=f"{floor:.3f}"):
        allocate_bits(layers, floor - 0.1)
    assert allocate_bits(layers, floor) == {"a": 4, "b": 2}


def test_bad_inputs_are_refused() -> None:
    with pytest.raises(ValueError, match="no layers"):
        allocate_bits([], 4.0)
    with pytest.raises(ValueError, match="duplicate"):
        allocate_bits([LayerOptions("a", 1, {8: 0.0}), LayerOptions("a", 1, {8: 0.0})], 8.0)
    with pytest.raises(ValueError, match="same candidates"):
        allocate_bits([LayerOptions("a", 1, {4: 0.0, 8: 0.0}, "t"), LayerOptions("b", 1, {8: 0.0}, "t")], 8.0)
    with pytest.raises(ValueError, match="no candidate"):
        LayerOptions("a", 1, {})
