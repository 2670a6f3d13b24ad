"""A searched sparse plan run in the shapes-video architecture (1,088 tokens per layer): the masked
pipeline matches the dense masked reference step by step, the density measured as the kernels ran
equals the plan's, and the hooks leave nothing behind."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from diffkiln.calibrate import CalibrationConfig, calibrate
from diffkiln.core.attention import AttentionCall, attention_calls
from diffkiln.core.sparse_plan import SparsePlanError
from diffkiln.kernels.sparse_attention import sparse_attention_reference
from diffkiln.nn.sparse_attention import sparse_plan_applied
from diffkiln.optimizer.sparse_search import SparseConfig, search_masks
from diffkiln.zoo.shapes_video_model import VIDEO_TEXT_LENGTH, assemble_shapes_video

STEPS = 4
KW = {"height": 64, "width": 64, "num_frames": 16, "max_sequence_length": VIDEO_TEXT_LENGTH}


@pytest.fixture(scope="module")
def video(tmp_path_factory: pytest.TempPathFactory) -> tuple[object, object]:
    torch.manual_seed(0)
    pipe = assemble_shapes_video(tmp_path_factory.mktemp("video"))  # random weights: the architecture
    pipe.set_progress_bar_config(disable=True)
    stats = calibrate(pipe, CalibrationConfig(prompts=("a red circle moving right",), steps=STEPS, progress=False,
                                              attention_stats=True, call_kwargs=tuple(KW.items())))  # fmt: skip
    assert stats.attention is not None and stats.attention.grids  # found during calibration
    return pipe, search_masks(stats.attention, SparseConfig(density=0.35))


def _latents(pipe: object, seed: int, steps: int = STEPS, **overrides: int) -> torch.Tensor:
    out = pipe("a red circle moving right", num_inference_steps=steps, output_type="latent",  # type: ignore[operator]
               generator=torch.Generator().manual_seed(seed), **{**KW, **overrides})  # fmt: skip
    return out.frames


def test_masked_pipeline_matches_the_reference_and_measures_the_plans_density(video: tuple) -> None:
    pipe, plan = video
    assert plan.layers and plan.density <= 0.35 + 1e-9
    calls: dict[str, int] = {}

    def reference(call: AttentionCall) -> torch.Tensor | None:
        lm = next((x for x in plan.layers if x.layer == call.layer), None)
        if lm is None:
            return None
        i = calls[call.layer] = calls.get(call.layer, -1) + 1
        from diffkiln.kernels.sparse_attention import BlockLayout

        g = plan.group_of((i // plan.calls_per_step) % plan.steps)
        masks = torch.stack([lm.mask(g, h, plan.block) for h in range(lm.heads)])
        layout = BlockLayout.from_mask(masks, lm.q_len, lm.kv_len, plan.block)
        return sparse_attention_reference(call.query, call.key, call.value, layout, call.scale)

    with attention_calls(pipe.transformer, reference):
        expected = _latents(pipe, 0)
    with sparse_plan_applied(pipe.transformer, plan) as run:
        got = _latents(pipe, 0)
    assert F.cosine_similarity(got.flatten(), expected.flatten(), dim=0) >= 0.9999
    assert run.density == pytest.approx(plan.density, rel=1e-6)
    dense = _latents(pipe, 0)
    assert not torch.equal(dense, got)  # the masks were in the computation
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in pipe.transformer.modules())  # removed


def test_another_resolution_is_refused_with_the_reason(video: tuple) -> None:
    pipe, plan = video
    with sparse_plan_applied(pipe.transformer, plan), pytest.raises(SparsePlanError, match="searched at"):
        _latents(pipe, 0, 1, height=48)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in pipe.transformer.modules())
    _latents(pipe, 0, 1)  # the interception ended with the failed call


def test_with_a_cache_schedule_reused_steps_run_no_attention_and_steps_stay_aligned(video: tuple) -> None:
    from diffkiln.core.cache_schedule import CacheMechanism, CacheSchedule
    from diffkiln.nn.cache import cache_schedule_applied

    pipe, plan = video
    compute = (True, False, True, False)
    blocks = tuple(f"blocks.{i}" for i in range(4))
    schedule = CacheSchedule(CacheMechanism.WHOLE, blocks, 0, 4, compute, calls_per_step=plan.calls_per_step)
    with cache_schedule_applied(pipe.transformer, schedule, pipe.scheduler), \
            sparse_plan_applied(pipe.transformer, plan) as run:  # fmt: skip
        _latents(pipe, 0)
    # Masked attention ran on the computing steps only, each with every masked layer and branch.
    per_step = len(plan.layers) * plan.calls_per_step
    assert run.masked_by_step == {0: per_step, 2: per_step}
    assert run.denoiser_calls == STEPS * plan.calls_per_step


def test_another_step_count_is_refused_before_anything_runs(video: tuple) -> None:
    pipe, plan = video
    with sparse_plan_applied(pipe.transformer, plan, pipe.scheduler) as run, \
            pytest.raises(SparsePlanError, match=f"num_inference_steps={STEPS}"):  # fmt: skip
        _latents(pipe, 0, STEPS + 2)
    assert run.dense == 0.0  # no masked attention ran
