"""Mixed-precision allocation: budgets, ties, infeasible budgets, and the plan it builds."""

from __future__ import annotations

import numpy as np
import pytest

from diffkiln.core.plan import ActMode, ActSpec, LayerPlan, Plan, WeightSpec
from diffkiln.optimizer.allocate import allocate_mixed
from diffkiln.optimizer.allocation import InfeasibleBudgetError
from diffkiln.optimizer.mixed import MixedConfig, WeightBudget, _mixed_layers, select_candidate, uniform_plan
from diffkiln.optimizer.roles import LayerRole
from diffkiln.optimizer.sensitivity import SensitivityEntry, SensitivityTable

ACT = ActSpec(bits=8, mode=ActMode.STATIC, scale=0.1, zero_point=0)


def _problem() -> tuple[Plan, SensitivityTable, dict[str, tuple[int, ...]]]:
    names = [f"blocks.{b}.attn.{p}" for b in range(3) for p in ("to_q", "to_k", "to_v", "proj")]
    layers = [
        LayerPlan("conv_in", "conv", None, None, reason="input projection (first layer)", params=100, out_channels=4)
    ]
    layers += [
        LayerPlan(n, "linear", WeightSpec(8), ACT, params=1000 * (1 + i % 3), out_channels=10)
        for i, n in enumerate(names)
    ]
    base = Plan("w8a8", {"id": "t"}, tuple(layers))
    roles = {n: (LayerRole.CONTENT if i % 2 else LayerRole.QUALITY) for i, n in enumerate(names)}
    entries = []
    for i, n in enumerate(names):
        role = roles[n].value
        for bits, base_err in ((2, 0.3), (4, 0.05), (8, 0.001)):
            err = base_err * (1 + i)
            if role == "content":
                entries.append(SensitivityEntry(n, role, "weight", bits, "ssim", 1 - err))
            else:
                entries.append(
                    SensitivityEntry(n, role, "weight", bits, "sqnr_db", -10 * __import__("math").log10(err))
                )
        entries.append(
            SensitivityEntry(
                n, role, "act", 8, "ssim" if role == "content" else "sqnr_db", 0.99 if role == "content" else 30.0
            )
        )
    table = SensitivityTable(roles, {lp.name: lp.params for lp in layers if lp.quantized}, tuple(entries))
    return base, table, {n: (2, 4, 8, 16) for n in names}


@pytest.mark.parametrize("group_size", [None, 64], ids=["per-channel", "group64"])
@pytest.mark.parametrize("budget_kind", list(WeightBudget), ids=lambda b: b.value)
@pytest.mark.parametrize("budget", [3.0, 4.0, 6.0])
def test_every_split_respects_the_weight_budget(
    budget: float, budget_kind: WeightBudget, group_size: int | None
) -> None:
    base, table, cands = _problem()
    config = MixedConfig(avg_weight_bits=budget, splits=3, budget=budget_kind, group_size=group_size)
    allocations = allocate_mixed(base, table, cands, config)
    assert allocations
    for _avgs, wbits, abits in allocations:
        plan = Plan("mixed", {}, _mixed_layers(base, wbits, abits, group_size))
        spent = plan.avg_stored_weight_bits if budget_kind is WeightBudget.STORED else plan.avg_weight_bits
        assert spent <= budget + 1e-9
        assert plan.avg_weight_bits <= plan.avg_stored_weight_bits  # scales only add
        assert plan.layer("conv_in").weight is None  # fixed FP layer counts 16 and stays FP
        assert all(abits[n] == 8 for n, b in wbits.items() if b < 16)  # no act budget: W*A8


def test_a_code_budget_overspends_bytes_where_a_stored_one_does_not() -> None:
    base, table, cands = _problem()
    overspent = []
    for budget in (3.0, 3.5, 4.0, 4.05, 4.5, 5.0, 6.0):
        for kind in WeightBudget:
            (_, wbits, abits), *_ = allocate_mixed(
                base, table, cands, MixedConfig(avg_weight_bits=budget, splits=1, budget=kind)
            )
            stored = Plan("mixed", {}, _mixed_layers(base, wbits, abits)).avg_stored_weight_bits
            if kind is WeightBudget.STORED:
                assert stored <= budget + 1e-9
            elif stored > budget:
                overspent.append(budget)
    assert overspent  # scales come on top of a code budget


@pytest.mark.parametrize(
    ("budget_kind", "floor"),
    [(WeightBudget.CODES, r"2\.0"), (WeightBudget.STORED, r"2\.1[0-9]+")],
    ids=["codes", "stored"],
)
def test_infeasible_budget_names_the_smallest_feasible_average(budget_kind: WeightBudget, floor: str) -> None:
    base, table, cands = _problem()
    with pytest.raises(InfeasibleBudgetError, match=rf"smallest feasible average is {floor}"):
        allocate_mixed(base, table, cands, MixedConfig(avg_weight_bits=2.0, budget=budget_kind))


def test_activation_budget_chooses_weight_only_layers() -> None:
    base, table, cands = _problem()
    config = MixedConfig(avg_weight_bits=5.0, avg_act_bits=10.0, splits=1)
    (_, wbits, abits), *_ = allocate_mixed(base, table, cands, config)
    plan = Plan("mixed", {}, _mixed_layers(base, wbits, abits))
    assert plan.avg_act_bits <= 10.0 + 1e-9
    assert any(lp.weight_only for lp in plan.layers) and any(lp.act is not None for lp in plan.layers)
    with pytest.raises(InfeasibleBudgetError, match="activation bits"):
        allocate_mixed(base, table, cands, MixedConfig(avg_weight_bits=5.0, avg_act_bits=8.0, splits=1))


def test_uniform_reference_plans() -> None:
    base, _, _ = _problem()
    w4 = uniform_plan(base, 4)
    assert {lp.weight.bits for lp in w4.layers if lp.weight} == {4}
    assert all(lp.act is not None for lp in w4.layers if lp.weight)
    assert uniform_plan(base, 4, act=False).avg_act_bits == 16.0


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"weight_candidates": (5, 16)}, "2, 3, 4, 8, 16"),
        ({"avg_weight_bits": 1.0}, "2..16"),
        ({"avg_act_bits": 4.0}, "8..16"),
        ({"budget": "stored"}, "WeightBudget"),
        ({"select_confidence": -1.0}, "standard errors"),
    ],
    ids=["5-bit-candidate", "budget-1", "act-budget-4", "budget-kind-as-string", "negative-confidence"],
)
def test_bad_mixed_settings_are_rejected(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        MixedConfig(**kwargs)  # type: ignore[arg-type]


def test_latency_budget_bounds_the_searched_layers() -> None:
    from diffkiln.optimizer.latency import LatencyTable

    base, table, cands = _problem()
    # Fewer bits run faster here, as on a device with native low-bit kernels.
    ms = {n: {2: 0.5, 4: 1.0, 8: 2.0, 16: 4.0} for n in cands}
    latency = LatencyTable(ms, "cpu")
    free = allocate_mixed(base, table, cands, MixedConfig(avg_weight_bits=4.0, splits=1))[0][1]
    bound = 0.95 * latency.total(free)
    cfg = MixedConfig(avg_weight_bits=4.0, splits=3, latency_budget_ms=bound)
    for _avgs, wbits, _ in allocate_mixed(base, table, cands, cfg, latency):
        assert latency.total(wbits) <= bound + 1e-6
    with pytest.raises(InfeasibleBudgetError, match="latency"):
        allocate_mixed(base, table, cands, MixedConfig(avg_weight_bits=4.0, splits=1, latency_budget_ms=1.0), latency)
    with pytest.raises(ValueError, match="latency table"):
        allocate_mixed(base, table, cands, cfg)


def test_uniform_candidate_is_measured_beside_the_splits() -> None:
    base, table, cands = _problem()
    allocations = allocate_mixed(base, table, cands, MixedConfig(avg_weight_bits=4.5, splits=2))
    uniform = [bits for avgs, bits, _ in allocations if "uniform" in avgs]
    assert uniform and set(uniform[0].values()) == {4}
    # More than one bit below the budget, a uniform allocation is no rival: not measured.
    far = allocate_mixed(base, table, cands, MixedConfig(avg_weight_bits=7.9, splits=1, weight_candidates=(2, 4, 16)))
    assert not [a for a, _, _ in far if "uniform" in a]


def test_selection_keeps_the_even_split_unless_another_is_measurably_better() -> None:
    rng = np.random.default_rng(0)
    even = 0.92 + 0.02 * rng.standard_normal(32)
    swing = np.tile([0.02, -0.02], 16)  # paired differences with a standard error of 0.0036
    noisy_winner = even + 0.003 + swing  # a higher mean, within 2 standard errors
    clear_winner = even + 0.03 + swing / 4
    worse = even - 0.1
    assert np.mean(noisy_winner) > np.mean(even)
    assert select_candidate([even, noisy_winner, worse], confidence=2.0) == 0
    assert select_candidate([even, noisy_winner, worse], confidence=0.0) == 1  # the plain maximum
    assert select_candidate([even, noisy_winner, clear_winner], confidence=2.0) == 2
    assert select_candidate([worse, even], confidence=2.0) == 1  # a bad first candidate is replaced
    with pytest.raises(ValueError, match="same length"):
        select_candidate([even, even[:8]], confidence=2.0)
