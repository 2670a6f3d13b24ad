"""The mask search beside a cache schedule: its proposals are solved for the attention that runs
under the schedule and validated under it, against the dense, uncached run, and the sparse recipe
receives the schedule searched before it. On a random-weight folder of the shapes-video
architecture (1,088 tokens per attention layer)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch

from diffkiln.api import CacheConfig, OptimizeConfig, SparseConfig, optimize, prepare
from diffkiln.core.cache_schedule import CacheSchedule
from diffkiln.nn.cache import cache_schedule_applied
from diffkiln.nn.sparse_attention import sparse_plan_applied
from diffkiln.optimizer import search_cache, search_sparse
from diffkiln.optimizer.cache_validate import LatentRun, worst_sample_sqnr
from diffkiln.optimizer.workload import output_tensor
from tests.runtime_e2e_helpers import VIDEO_KW, random_video_folder

KW = VIDEO_KW
SPARSE = SparseConfig(density=0.5, validate_samples=1)
CACHE = CacheConfig(budget=0.6, validate_samples=1, refine=0)


@pytest.fixture(scope="module")
def calibration(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One calibration cache for both tests (the same folder and settings)."""
    return tmp_path_factory.mktemp("calibration")


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return random_video_folder(tmp_path_factory.mktemp("video"))


def _config(out: Path, cache_dir: Path) -> OptimizeConfig:
    return OptimizeConfig(out=out, recipe=SPARSE, cache=CACHE, calib_size=2, steps=4, call_kwargs=KW,
                          progress=False, cache_dir=cache_dir)  # fmt: skip


def test_each_proposal_is_scored_under_the_schedule_against_the_dense_uncached_run(
    folder: Path, calibration: Path, tmp_path: Path
) -> None:
    config = _config(tmp_path / "b", calibration)
    prep = prepare(str(folder), config)
    schedule = search_cache(prep.pipe, prep.stats, CACHE, prep.context(config))
    assert not all(schedule.compute)
    plain = search_sparse(prep.pipe, prep.stats, SPARSE)
    under = search_sparse(prep.pipe, prep.stats, SPARSE, schedule=schedule)
    assert plain.search["under_cache_schedule"] is None
    assert under.search["under_cache_schedule"] == schedule.pattern
    # The same proposals, solved with the schedule's reuse (the budget counts the attention that
    # runs) and scored with it in the run: every score moves.
    rows = {r["proposal"]: r for r in plain.search["validated"]}
    rows_under = {r["proposal"]: r for r in under.search["validated"]}
    assert rows.keys() == rows_under.keys()
    assert all(rows_under[k]["sqnr_db"] != rows[k]["sqnr_db"] for k in rows)
    # The kept masks' score, measured again through the runtime's hooks: masks inside the cache
    # schedule's hooks, against a run with neither.
    window = under.search["validation_samples"]
    measure = LatentRun(prep.pipe, prep.stats, window["samples"], fresh_noise=True, first=window["first"])
    with cache_schedule_applied(measure.denoiser, schedule, prep.pipe.scheduler), \
            sparse_plan_applied(measure.denoiser, under), torch.no_grad():  # fmt: skip
        got = output_tensor(measure.sampling.run(prep.pipe))
    score = worst_sample_sqnr(measure.reference, got)
    assert score == pytest.approx(rows_under[under.search["proposal"]]["sqnr_db"], abs=1e-3)


def test_the_sparse_recipe_is_validated_under_the_cache_searched_before_it(
    folder: Path, calibration: Path, tmp_path: Path
) -> None:
    bundle = optimize(str(folder), _config(tmp_path / "b", calibration))
    manifest = json.loads((bundle / "manifest.json").read_text())
    schedule = CacheSchedule.from_dict(manifest["cache"])
    assert manifest["plan"]["recipe"] == "sparse" and not all(schedule.compute)
    assert manifest["sparsity"]["search"]["under_cache_schedule"] == schedule.pattern


# Four bundles built: the sweep builders composing the two searches as the recipe above does (its
# composition runs in CI); in ``make test-slow``.
@pytest.mark.slow
def test_sweeps_search_each_bundles_masks_under_its_own_schedule(
    folder: Path, calibration: Path, tmp_path: Path
) -> None:
    from diffkiln.api import W8A8Config, build_cache_sweep, build_sparse_sweep

    def record(bundle: Path) -> tuple[dict[str, Any], dict[str, Any]]:
        manifest = json.loads((bundle / "manifest.json").read_text())
        return manifest["cache"], manifest["sparsity"]["search"]

    # A cache sweep of a W8A8 build with masks: each bundle's masks searched under its own schedule.
    config = replace(_config(tmp_path / "cache-sweep", calibration), recipe=W8A8Config(), sparse=SPARSE)
    build = build_cache_sweep(str(folder), config, (0.6,))
    assert set(build.bundles) == {"uncached", "cache-0.6"}
    cache, search = record(build.bundles["uncached"])
    assert cache == {} and search["under_cache_schedule"] is None
    cache, search = record(build.bundles["cache-0.6"])
    schedule = CacheSchedule.from_dict(cache)
    assert schedule.compute_fraction <= 0.6 + 1e-9 and search["under_cache_schedule"] == schedule.pattern
    # An attention sweep of a W8A8 build with a cache: the schedule searched once, in every bundle
    # (the dense one too), each density's masks searched under it.
    build = build_sparse_sweep(str(folder), replace(config, out=tmp_path / "attn-sweep", sparse=None, cache=CACHE),
                               (0.5,))  # fmt: skip
    assert set(build.bundles) == {"dense", "sparse-0.5"}
    dense = json.loads((build.bundles["dense"] / "manifest.json").read_text())["cache"]
    cache, search = record(build.bundles["sparse-0.5"])
    assert cache == dense and not all(CacheSchedule.from_dict(cache).compute)
    assert search["under_cache_schedule"] == CacheSchedule.from_dict(cache).pattern
