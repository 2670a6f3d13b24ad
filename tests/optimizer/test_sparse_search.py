"""The mask search on synthetic statistics with a known answer, the plan section's strict round trip,
and the budget kept."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from diffkiln.calibrate.attention_stats import AttentionStats, LayerGeometry
from diffkiln.core.cache_schedule import CacheMechanism, CacheSchedule
from diffkiln.core.errors import InvalidInputError
from diffkiln.core.sparse_plan import SparsePlan, SparsePlanError, pack_mask, unpack_mask
from diffkiln.kernels.sparse_attention import BlockLayout
from diffkiln.optimizer.sparse_search import SparseConfig, search_masks

GRID = {"frames": 8, "height": 4, "width": 4, "prefix": 0, "suffix": 0}  # 128 tokens; a 16-token block is a frame


def _stats(steps: int = 4) -> AttentionStats:
    """Two layers of two heads: head 0 attends to nearby frames (drop error falls with the frame
    distance), head 1 to the first frame and itself."""
    i, j = torch.arange(8)[:, None], torch.arange(8)[None]
    near = torch.exp(-(i - j).abs().float())
    sink = ((j == 0) | (i == j)).float() + 0.01
    mass, drop = {}, {}
    for name in ("blocks.0.attn", "blocks.1.attn"):
        m = torch.stack([near / near.sum(1, keepdim=True), sink / sink.sum(1, keepdim=True)])
        mass[name] = m.expand(steps, 2, 8, 8).clone()
        drop[name] = (m * 10).expand(steps, 2, 8, 8).clone()
    layers = tuple(LayerGeometry(n, 2, 128, 128) for n in mass)
    return AttentionStats(16, steps, 2, layers, mass, drop, {n: GRID for n in mass})


@pytest.mark.parametrize("density", [0.6, 0.4, 0.25])  # 8 blocks and a sink: 0.211 at the least
def test_search_keeps_the_budget_and_the_blocks_that_matter(density: float) -> None:
    stats = _stats()
    plan = search_masks(stats, SparseConfig(density=density, groups=2))
    assert plan.density <= density + 1e-9 and plan.group_starts == (0, 2)
    # The planned density is the masks' own, token-weighted.
    measured = [BlockLayout.from_mask(lm.mask(g, h, 16)[None], 128, 128, 16).density
                for lm in plan.layers for g in range(2) for h in range(2)]  # fmt: skip
    assert sum(measured) / len(measured) == pytest.approx(plan.density)
    for lm in plan.layers:
        for g in range(2):
            near, sink = lm.mask(g, 0, 16), lm.mask(g, 1, 16)
            assert bool(near.diagonal().all()) and bool(sink[:, 0].all()) and bool(sink.diagonal().all())
    assert plan.search["planned_error"] >= 0


def _density_as_run(plan: SparsePlan, schedule: CacheSchedule) -> float:
    """Kept over dense attention FLOPs over the calls that run under ``schedule`` (what the runtime
    counts), from the plan's masks."""
    kept = dense = 0.0
    for lm in plan.layers:
        runs = schedule.runs_at(lm.layer)
        for gi, start in enumerate(plan.group_starts):
            end = plan.group_starts[gi + 1] if gi + 1 < len(plan.group_starts) else plan.steps
            calls = sum(runs[start:end]) * lm.q_len * lm.kv_len
            for mask in lm.masks[gi]:
                m = unpack_mask(mask, -(-lm.q_len // plan.block), -(-lm.kv_len // plan.block))
                kept += BlockLayout.from_mask(m[None], lm.q_len, lm.kv_len, plan.block).density * calls
                dense += calls
    return kept / dense


def test_under_a_cache_schedule_the_budget_goes_where_attention_runs() -> None:
    """blocks.1 is reused on steps 2 and 3: its masks there never run, so they count neither in the
    budget nor in the error, and the density as the runtime counts it is the plan's (without the
    schedule, the plan counts calls that never run)."""
    stats, config = _stats(), SparseConfig(density=0.4, groups=2)
    schedule = CacheSchedule(CacheMechanism.DEEP, ("blocks.0", "blocks.1"), 1, 2, (True, True, False, False))
    assert schedule.runs_at("blocks.1.attn") == (True, True, False, False)
    assert schedule.runs_at("blocks.0.attn") == (True,) * 4 and schedule.runs_at("blocks.10.attn") == (True,) * 4
    plain = search_masks(stats, config)
    under = search_masks(stats, config, schedule=schedule)
    assert under.density == pytest.approx(_density_as_run(under, schedule)) and under.density <= 0.4 + 1e-9
    assert plain.density != pytest.approx(_density_as_run(plain, schedule))  # counted over every step
    with pytest.raises(InvalidInputError, match="the cache schedule has 3 steps and the attention statistics 4"):
        search_masks(stats, config, schedule=CacheSchedule(CacheMechanism.WHOLE, ("blocks.0",), 0, 1, (True,) * 3))


def test_a_budget_below_the_sparsest_candidates_is_refused() -> None:
    stats = _stats()
    with pytest.raises(InvalidInputError, match="higher --attn-density"):
        search_masks(stats, SparseConfig(density=0.01))
    with pytest.raises(InvalidInputError, match="in \\(0, 1\\]"):
        SparseConfig(density=1.5)


def test_plan_section_round_trips_and_is_read_strictly() -> None:
    stats = _stats()
    plan = search_masks(stats, SparseConfig(density=0.35))
    text = json.dumps(plan.to_dict())
    again = SparsePlan.from_dict(json.loads(text))
    assert again == plan and json.dumps(again.to_dict()) == text
    bad = json.loads(text)
    bad["extra"] = 1
    with pytest.raises(SparsePlanError, match="exactly the keys"):
        SparsePlan.from_dict(bad)
    bad = json.loads(text)
    bad["layers"][0]["masks"][0][0] = pack_mask(torch.zeros(8, 8, dtype=torch.bool))
    with pytest.raises(SparsePlanError, match="keeps no key block"):
        SparsePlan.from_dict(bad)
    bad = json.loads(text)
    bad["layers"][0]["masks"][0][0] = "00"
    with pytest.raises(SparsePlanError, match="needs 8 bytes"):
        SparsePlan.from_dict(bad)
    mask = torch.rand(5, 7) < 0.5
    assert torch.equal(unpack_mask(pack_mask(mask), 5, 7), mask)


def test_no_maskable_layer_is_refused_naming_the_longest_and_the_fix() -> None:
    empty = AttentionStats(64, 2, 1, (), {}, {}, {})
    left = {"blocks.0.attn1": ("short", 96), "blocks.0.attn2": ("short", 32), "blocks.1.attn1": ("mask", 512)}
    with pytest.raises(
        InvalidInputError,
        match=r"left all 3 dense \(e\.g\. blocks\.0\.attn1: fewer key tokens than "
        r"two blocks of 64, 96 key tokens\).*longest had 96 key tokens.*--attn-block 32;",
    ):
        search_masks(dataclasses.replace(empty, left_dense=left), SparseConfig(density=0.5))
    # Too short even for the smallest block: only a larger size helps.
    with pytest.raises(InvalidInputError, match=r"deploy \(--call-arg height=H --call-arg width=W \.\.\.\)$"):
        search_masks(dataclasses.replace(empty, left_dense={"a": ("short", 20)}), SparseConfig(density=0.5))
    with pytest.raises(InvalidInputError, match="no attention call it could intercept"):
        search_masks(dataclasses.replace(empty, left_dense={}), SparseConfig(density=0.5))
    # Statistics cached before the left-dense layers were recorded: the rule, without names.
    meta = {k: v for k, v in empty.to_meta().items() if k != "left_dense"}
    with pytest.raises(InvalidInputError, match="at least two key blocks of 64 tokens"):
        search_masks(AttentionStats.from_meta(meta, {}), SparseConfig(density=0.5))


def test_a_search_at_another_block_size_than_calibrated_is_refused() -> None:
    from diffkiln.calibrate.stats import CalibrationStats
    from diffkiln.optimizer.sparse_search import search_sparse

    stats = CalibrationStats({}, [], "", attention=_stats())  # blocks of 16
    with pytest.raises(InvalidInputError, match="attention_block=64"):
        search_sparse(None, stats, SparseConfig())
    with pytest.raises(InvalidInputError, match="power of two"):
        SparseConfig(block=100)


@pytest.mark.parametrize(
    ("total", "batch", "samples", "expected"),
    [
        (32, 8, 4, {"first": 8, "samples": 4, "unseen": 4}),  # enough inputs: all outside the first batch
        (10, 8, 4, {"first": 6, "samples": 4, "unseen": 2}),  # the last 4: as many unseen as there are
        (8, 8, 4, {"first": 4, "samples": 4, "unseen": 0}),  # every input seen: fresh noise alone
        (3, 8, 4, {"first": 0, "samples": 3, "unseen": 0}),  # fewer inputs than asked
    ],
)
def test_validation_samples_the_inputs_the_attention_statistics_did_not_see(total, batch, samples, expected) -> None:
    from types import SimpleNamespace

    from diffkiln.calibrate.sources import PromptSource
    from diffkiln.optimizer.sparse_search import validation_samples

    prompts = tuple(f"prompt {i}" for i in range(total))
    stats = SimpleNamespace(settings={"source": PromptSource(prompts).describe(), "batch_size": batch})
    assert validation_samples(stats, samples) == expected
