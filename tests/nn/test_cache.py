"""Cache-schedule hooks (diffkiln.nn.cache) on a matrix of diffusers classes built tiny: blocks
found from the data flow, every mechanism the layout allows applied, counts, exactness, removal,
refusals."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
import torch

from diffkiln.calibrate import CalibrationConfig, calibrate
from diffkiln.calibrate.cache_stats import CacheStats
from diffkiln.core.cache_schedule import CacheMechanism, CacheSchedule, CacheScheduleError
from diffkiln.generation import load_pipeline
from diffkiln.nn.cache import apply_cache_schedule, cache_schedule_applied, remove_cache_schedule
from diffkiln.zoo.catalog import TINY_CATALOG
from tests.runtime_e2e_helpers import CACHE

MODELS = ("tiny-sd15", "tiny-sdxl", "tiny-sd3", "tiny-flux", "tiny-pixart", "tiny-wan", "shapes-unet", "shapes-dit")
CALL_KWARGS = {e.name: dict(e.call_kwargs) for e in TINY_CATALOG}
STEPS = 4
PATTERN = (True, False, True, False)


def _calibrated(name: str) -> tuple[Any, CacheStats, str]:
    pipe = load_pipeline(name)
    pipe.set_progress_bar_config(disable=True)
    config = CalibrationConfig(("a red circle on the left", "a blue square"), steps=STEPS, batch_size=2, progress=False,
                               cache_dir=CACHE, call_kwargs=tuple(CALL_KWARGS.get(name, {}).items()),
                               cache_stats=True)  # fmt: skip
    stats = calibrate(pipe, config)
    assert stats.cache is not None
    return pipe, stats.cache, stats.denoiser


def _run(pipe: Any, name: str, steps: int = STEPS) -> torch.Tensor:
    out = pipe("a red circle on the left", **CALL_KWARGS.get(name, {}), num_inference_steps=steps,
               generator=torch.Generator().manual_seed(0), output_type="latent")  # fmt: skip
    return out[0] if isinstance(out, tuple) else (out.images if hasattr(out, "images") else out.frames)


def _schedules(cache: CacheStats, compute: tuple[bool, ...]) -> list[CacheSchedule]:
    out = []
    for cand in cache.candidates:
        blist = cache.layout.lists[cand.list_index] if cand.list_index >= 0 else None
        out.append(CacheSchedule(CacheMechanism(cand.mechanism), cache.layout.blocks, cand.start, cand.end, compute,
                                 cache.calls_per_step, blist.streams if blist else (),
                                 blist.output_arity if blist else 0))  # fmt: skip
    return out


@pytest.mark.parametrize("name", MODELS)
def test_every_mechanism_runs_counts_and_computes_exactly(name: str) -> None:
    pipe, cache, denoiser_name = _calibrated(name)
    denoiser = getattr(pipe, denoiser_name)
    reference = _run(pipe, name)
    mechanisms = {c.mechanism for c in cache.candidates}
    assert "whole" in mechanisms
    for schedule in _schedules(cache, PATTERN):
        with cache_schedule_applied(denoiser, schedule, pipe.scheduler) as run:
            cached = _run(pipe, name)
        # The hooks count what ran; it must be what the schedule plans, on every branch.
        assert run.evaluated / run.uncached == pytest.approx(schedule.compute_fraction), schedule
        assert torch.isfinite(cached).all() and cached.shape == reference.shape
        full = dataclasses.replace(schedule, compute=(True,) * STEPS)
        with cache_schedule_applied(denoiser, full, pipe.scheduler) as run:
            assert torch.equal(_run(pipe, name), reference)  # computing every step is the uncached model
        assert run.evaluated == run.uncached
    assert not denoiser._diffusers_hook.hooks  # removed on exit
    assert torch.equal(_run(pipe, name), reference)


def test_blocks_and_streams_come_from_the_data_flow() -> None:
    _, cache, _ = _calibrated("shapes-dit")
    layout = cache.layout
    assert layout.blocks == tuple(f"transformer_blocks.{i}" for i in range(4))
    (blist,) = layout.lists
    # SD3's joint block returns (encoder_hidden_states, hidden_states); its last block ends the
    # text stream (returns None for it), so skipped ranges end before it.
    assert [(s.output_index, s.argument) for s in blist.streams] == [(0, "encoder_hidden_states"), (1, "hidden_states")]
    assert blist.residual_end == 3
    _, unet_cache, _ = _calibrated("shapes-unet")
    # down (3), mid, up (3) in call order; down blocks also return skip tensors: no residual list
    assert len(unet_cache.layout.blocks) == 7 and unet_cache.layout.blocks[3] == "mid_block"
    assert not any(b.residual_capable for b in unet_cache.layout.lists)
    assert {c.name for c in unet_cache.candidates} == {"whole", "deep[1:6]", "deep[2:5]", "deep[3:4]"}


def test_another_step_count_is_refused_before_anything_runs() -> None:
    pipe, cache, denoiser_name = _calibrated("tiny-pixart")
    denoiser = getattr(pipe, denoiser_name)
    (schedule, *_) = _schedules(cache, PATTERN)
    with cache_schedule_applied(denoiser, schedule, pipe.scheduler) as run:
        with pytest.raises(
            CacheScheduleError, match=r"for 4 sampler steps, but the pipeline runs 6.*num_inference_steps=4"
        ):
            _run(pipe, "tiny-pixart", steps=6)
        assert run.evaluated == 0
        run.reset()
        _run(pipe, "tiny-pixart")  # the schedule's own count still runs, twice in a row
        _run(pipe, "tiny-pixart")
        assert run.evaluated == 2 * schedule.block_evaluations()
    with cache_schedule_applied(denoiser, schedule) as run:  # no scheduler: refused at the step past the last
        with pytest.raises(CacheScheduleError, match="a step past the 4"):
            _run(pipe, "tiny-pixart", steps=6)
        run.reset()
        _run(pipe, "tiny-pixart")
        with pytest.raises(CacheScheduleError, match="call reset"):  # a new run without reset is not guessed
            _run(pipe, "tiny-pixart")


def test_another_cache_on_top_is_refused() -> None:
    from diffusers.hooks import FirstBlockCacheConfig

    pipe, cache, denoiser_name = _calibrated("tiny-wan")
    denoiser = getattr(pipe, denoiser_name)
    (schedule, *_) = _schedules(cache, PATTERN)
    apply_cache_schedule(denoiser, schedule, pipe.scheduler)
    try:
        denoiser.enable_cache(FirstBlockCacheConfig(threshold=0.2))
        with pytest.raises(CacheScheduleError, match=r"another cache .*fbc.* runs on top"):
            _run(pipe, "tiny-wan")
        denoiser.disable_cache()
        _run(pipe, "tiny-wan")
        with pytest.raises(CacheScheduleError, match="applied to this denoiser already"):
            apply_cache_schedule(denoiser, schedule, pipe.scheduler)
    finally:
        remove_cache_schedule(denoiser)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"compute": (False, True, True, True)}, "step 0 must compute"),
        ({"compute": ()}, "at least one step"),
        ({"start": 3, "end": 9}, "not within"),
        ({"mechanism": "teacache"}, "unknown cache mechanism 'teacache'; valid"),
        ({"budget": 0.0}, r"budget must be in \(0, 1\]"),
        ({"budget": 1.5}, r"budget must be in \(0, 1\]"),
        ({"calls_per_step": 0}, "calls_per_step"),
    ],
)
def test_bad_schedules_are_refused(change: dict[str, Any], message: str) -> None:
    good = CacheSchedule(CacheMechanism.DEEP, ("a", "b", "c"), 1, 2, PATTERN)
    data = {**good.to_dict(), **change}
    data["compute"] = list(data["compute"])
    with pytest.raises(CacheScheduleError, match=message):
        CacheSchedule.from_dict(data)


def test_schedule_round_trips_through_json() -> None:
    import json

    from diffkiln.core.cache_schedule import Stream

    schedule = CacheSchedule(CacheMechanism.RESIDUAL, ("x.0", "x.1", "x.2"), 0, 2, (True, False, True), 2,
                             (Stream(1, "hidden_states"), Stream(0, "encoder_hidden_states")), 2, True, 0.7,
                             {"validated": [{"score": 0.9}]})  # fmt: skip
    assert CacheSchedule.from_dict(json.loads(json.dumps(schedule.to_dict()))) == schedule
    with pytest.raises(CacheScheduleError, match="'compute' must be a list of booleans"):
        CacheSchedule.from_dict({**schedule.to_dict(), "compute": [1, 0, 1]})


def test_hooks_run_under_torch_compile() -> None:
    pipe, cache, denoiser_name = _calibrated("shapes-dit")
    denoiser = getattr(pipe, denoiser_name)
    schedule = next(s for s in _schedules(cache, PATTERN) if s.mechanism is CacheMechanism.RESIDUAL)
    with cache_schedule_applied(denoiser, schedule, pipe.scheduler):
        eager = _run(pipe, "shapes-dit")
    for name in schedule.blocks:  # regional compilation, as diffusers recommends for repeated blocks
        denoiser.get_submodule(name).compile(backend="eager")
    with cache_schedule_applied(denoiser, schedule, pipe.scheduler) as run:
        compiled = _run(pipe, "shapes-dit")
    assert torch.allclose(compiled, eager, atol=1e-5) and run.evaluated / run.uncached == schedule.compute_fraction
