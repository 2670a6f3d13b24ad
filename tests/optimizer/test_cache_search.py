"""The cache-schedule search: the dynamic programme against brute force, budgets, validation."""

from __future__ import annotations

import dataclasses
import itertools
import logging

import pytest
import torch

from diffkiln.calibrate import CalibrationConfig, calibrate
from diffkiln.core.errors import InvalidInputError
from diffkiln.core.metrics import sqnr_db
from diffkiln.generation import load_pipeline
from diffkiln.nn.cache import cache_schedule_applied
from diffkiln.optimizer import CacheConfig, SearchContext, search_cache
from diffkiln.optimizer.cache_search import (
    LOW_SCORE_DB,
    dp_schedule,
    full_steps_allowed,
    leading_computed,
    uniform_schedule,
)
from diffkiln.optimizer.cache_validate import longest_reuse, worst_sample_sqnr
from tests.runtime_e2e_helpers import CACHE, PROMPTS


def _trailing_reuse(flags: tuple[bool, ...]) -> int:
    return len(flags) - 1 - max(i for i, c in enumerate(flags) if c)


def _brute_force(d: torch.Tensor, k_max: int, max_run: int | None = None, max_tail: int | None = None) -> float:
    n = d.shape[0]
    best = float("inf")
    for k in range(1, k_max + 1):
        for rest in itertools.combinations(range(1, n), k - 1):
            computed, last, cost = {0, *rest}, 0, 0.0
            flags = tuple(t in computed for t in range(n))
            if max_run is not None and longest_reuse(flags) > max_run:
                continue
            if max_tail is not None and _trailing_reuse(flags) > max_tail:
                continue
            for t in range(n):
                if t in computed:
                    last = t
                else:
                    cost += float(d[last, t])
            best = min(best, cost)
    return best


@pytest.mark.parametrize("seed", range(16))
def test_dp_finds_the_brute_force_optimum(seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    n = 7
    d = torch.rand(n, n, generator=gen)
    k = 1 + seed % n
    max_run = None if seed % 2 else 1 + seed % 3
    max_tail = None if seed % 4 < 2 else seed % 3  # the last run bounded apart from the others
    compute, cost = dp_schedule(d, k, max_run, max_tail)
    expected = _brute_force(d, k, max_run, max_tail)
    if expected == float("inf"):
        assert cost == float("inf")
        return
    assert compute[0] and sum(compute) <= k
    assert max_run is None or longest_reuse(compute) <= max_run
    assert max_tail is None or _trailing_reuse(compute) <= max_tail
    assert cost == pytest.approx(expected)
    last, recomputed = 0, 0.0
    for t in range(n):  # the flags it returns cost what it says
        last, recomputed = (t, recomputed) if compute[t] else (last, recomputed + float(d[last, t]))
    assert recomputed == pytest.approx(cost)


def test_budget_arithmetic() -> None:
    assert full_steps_allowed(20, 4, 4, 0.5) == 10  # whole: half the steps
    assert full_steps_allowed(20, 7, 5, 0.5) == 6  # DeepCache on a 7-block UNet: 6 full, 14 shallow
    assert full_steps_allowed(20, 4, 1, 0.5) == 0  # skipping one block of four cannot reach half
    assert full_steps_allowed(20, 4, 4, 1.0) == 20
    assert uniform_schedule(10, 5) == (True, False) * 5


@pytest.mark.parametrize("budget", [0.0, -0.1, 1.01])
def test_bad_budgets_are_refused(budget: float) -> None:
    with pytest.raises(InvalidInputError, match=r"budget must be in \(0, 1\]"):
        CacheConfig(budget=budget)


def test_unknown_mechanism_is_refused() -> None:
    with pytest.raises(InvalidInputError, match="mechanisms must be some of"):
        CacheConfig(mechanisms=("teacache",))


@pytest.mark.parametrize("retain", [-0.1, 1.0, 1.5])
def test_bad_retained_fractions_are_refused(retain: float) -> None:
    with pytest.raises(InvalidInputError, match=r"retained fraction of first steps must be in \[0, 1\)"):
        CacheConfig(retain=retain)


@pytest.fixture(scope="module")
def dit() -> tuple[object, object]:
    pipe = load_pipeline("shapes-dit")
    stats = calibrate(pipe, CalibrationConfig(PROMPTS[:4], steps=10, batch_size=4, cache_dir=CACHE, progress=False,
                                              cache_stats=True))  # fmt: skip
    return pipe, stats


class _Warnings(logging.Handler):
    """The warnings one logger emits, counted at that logger (whatever other tests left on the root
    logger or on ``diffkiln``'s propagation)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.mark.parametrize("budget", [0.35, 0.5, 0.7])
def test_search_keeps_the_best_measured_schedule_within_budget(dit, budget: float) -> None:
    pipe, stats = dit
    logger, warned = logging.getLogger("diffkiln.optimizer.cache_search"), _Warnings()
    logger.addHandler(warned)
    try:
        schedule = search_cache(pipe, stats, CacheConfig(budget=budget, validate_samples=2),
                                SearchContext(progress=False))  # fmt: skip
    finally:
        logger.removeHandler(warned)
    # A kept schedule that loses most of the final latents is said, with what to do.
    low = schedule.search["score"] < LOW_SCORE_DB
    assert low == (budget < 0.5), schedule.search["score"]  # measured at 10 steps: 4.7, 16.6 and 26.2 dB
    assert len(warned.messages) == int(low), warned.messages
    if low:
        assert f"budget of {budget:g} keeps only" in warned.messages[0] and "--cache-budget" in warned.messages[0]
    rows = schedule.search["validated"]
    assert any(r["schedule"] == "whole uniform interval" for r in rows)
    flags = schedule.pattern
    chosen = [r["score"] for r in rows if r["compute"] == flags]
    assert chosen and max(chosen) == max(r["score"] for r in rows)  # the best measured one is kept
    with cache_schedule_applied(pipe.transformer, schedule, pipe.scheduler) as run:
        pipe("a red circle", num_inference_steps=10, output_type="latent", generator=torch.Generator().manual_seed(0))
    assert run.compute_fraction == pytest.approx(schedule.compute_fraction)


def test_the_search_also_proposes_schedules_that_compute_the_first_steps(dit) -> None:
    """Proxies that make step 1 free to reuse: the programme reuses it, the retaining proposals
    compute the first 20% of the steps, and validation sees them with the bound on every run of
    reusing steps and with it on the last run only."""
    pipe, stats = dit
    n = stats.cache.steps
    cheap_start = torch.ones(n, n)
    cheap_start[0, 1] = 0.0
    cache = dataclasses.replace(stats.cache, distances=cheap_start.expand_as(stats.cache.distances).clone())
    config = CacheConfig(budget=0.5, validate_samples=2, refine=0)
    schedule = search_cache(pipe, dataclasses.replace(stats, cache=cache), config, SearchContext(progress=False))
    rows = schedule.search["validated"]
    assert any(r["compute"].startswith("Cr") for r in rows if "(proxy)" in r["schedule"])
    bound = max(longest_reuse(uniform_schedule(n, 5)), 2)
    retaining = [r for r in rows if "first 2 computed" in r["schedule"]]
    assert retaining and all(r["compute"].startswith("CC") for r in retaining), rows
    bounded = [r for r in retaining if "runs of reuse" in r["schedule"]]
    assert bounded and all(longest_reuse(tuple(c == "C" for c in r["compute"])) <= bound for r in bounded)
    assert len(bounded) < len(retaining)  # the variant with unbounded runs in the middle is validated too
    whole = [r for r in retaining if r["schedule"].startswith("whole")]  # 5 computing steps, as ``bound``
    assert whole and all(_trailing_reuse(tuple(c == "C" for c in r["compute"])) <= bound for r in whole)


def test_the_local_search_keeps_the_leading_computing_steps(dit) -> None:
    pipe, stats = dit
    schedule = search_cache(pipe, stats, CacheConfig(budget=0.35, validate_samples=2, refine=12),
                            SearchContext(progress=False))  # fmt: skip
    rows = schedule.search["validated"]
    validated = [r for r in rows if r["schedule"] != "local move"]
    start = max(validated, key=lambda r: r["score"])["compute"]
    lead = leading_computed(tuple(c == "C" for c in start))
    moves = [r for r in rows if r["schedule"] == "local move"]
    assert moves and all(r["compute"][:lead] == "C" * lead for r in moves)
    assert schedule.pattern[:lead] == "C" * lead


def test_retained_first_steps_compute_in_every_validated_schedule(dit) -> None:
    pipe, stats = dit
    config = CacheConfig(budget=0.5, validate_samples=2, refine=6, retain=0.3)
    schedule = search_cache(pipe, stats, config, SearchContext(progress=False))
    assert schedule.compute[:3] == (True, True, True)
    rows = schedule.search["validated"]
    assert rows and all(r["compute"].startswith("CCC") for r in rows)
    assert schedule.compute_fraction <= 0.5 + 1e-9


def test_the_worst_samples_colour_drift_is_what_the_measure_sees() -> None:
    """A channel-mean shift in one sample of eight: small against the pooled energy, the whole
    measure at the coarse scales."""
    gen = torch.Generator().manual_seed(0)
    ref = torch.randn(8, 4, 16, 16, generator=gen)
    drift = ref.clone()
    drift[3, 1] += 0.3  # one sample's channel 1 moves as a whole (a colour change)
    noise = ref + 0.1 * torch.randn(ref.shape, generator=gen)  # every sample a little noisy
    assert sqnr_db(ref.numpy(), drift.numpy()) > sqnr_db(ref.numpy(), noise.numpy())  # pooled: drift looks better
    assert worst_sample_sqnr(ref, drift) < worst_sample_sqnr(ref, noise) - 5  # the measure: clearly worse
    assert worst_sample_sqnr(ref, ref) == 200.0
    video = torch.randn(2, 3, 5, 4, 4, generator=gen)  # (B, C, F, H, W) latents pool over H, W
    assert worst_sample_sqnr(video, video + 0.01) < 200.0
    with pytest.raises(ValueError, match="cannot be compared"):
        worst_sample_sqnr(ref, ref[:4])


def test_a_budget_no_mechanism_fits_is_refused(dit) -> None:
    pipe, stats = dit
    with pytest.raises(InvalidInputError, match=r"no cache mechanism fits a budget of 0\.5"):
        search_cache(pipe, stats, CacheConfig(budget=0.5, mechanisms=("deep",)), SearchContext(progress=False))


def test_fresh_noise_runs_the_calibration_inputs_from_seeds_calibration_did_not_use(dit) -> None:
    from diffkiln.optimizer.cache_validate import LatentRun

    pipe, stats = dit
    seen, fresh = LatentRun(pipe, stats, 2), LatentRun(pipe, stats, 2, fresh_noise=True)
    assert seen.samples == fresh.samples  # the same prompts
    assert seen.sampling.seed == stats.settings["seed"] and fresh.sampling.seed == stats.settings["seed"] + 4
    assert fresh.reference.shape == seen.reference.shape and not torch.allclose(fresh.reference, seen.reference)


def test_a_run_from_a_later_sample_takes_its_inputs_and_seeds(dit) -> None:
    from diffkiln.optimizer.workload import CalibrationCalls

    pipe, stats = dit
    later = CalibrationCalls.of(pipe, stats, 4, output_type="latent", first=2)
    whole = CalibrationCalls.of(pipe, stats, 4, output_type="latent")
    assert later.samples == whole.samples[2:]  # clipped at the calibration's 4 inputs
    assert later.seed == whole.seed + 2  # calibration seeded sample i with seed + i
    fresh = CalibrationCalls.of(pipe, stats, 4, output_type="latent", fresh_noise=True, first=2)
    assert fresh.seed == whole.seed + 4 + 2
    with pytest.raises(InvalidInputError, match="sample 4 does not exist"):
        CalibrationCalls.of(pipe, stats, 1, output_type="latent", first=4)
