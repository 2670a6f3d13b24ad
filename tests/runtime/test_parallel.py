"""Parallel inference over two gloo processes. CFG parallel: each rank runs half of every batched
denoiser call, and the latents match one process (SD1.5- and SD3-class W8A8 bundles); a call whose
batch does not divide runs whole on both ranks. Ulysses context parallel (a Wan-class W8A8 bundle):
each rank runs half of the sequence. Spawns processes: skipped where that is not possible
(``DIFFKILN_NO_SPAWN=1``)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch

from diffkiln.core.metrics import sqnr_db
from diffkiln.optimizer import W8A8Config
from diffkiln.runtime import ParallelConfig, load
from tests.runtime_e2e_helpers import build_bundle
from tests.two_ranks import start_two

pytestmark = pytest.mark.skipif(os.environ.get("DIFFKILN_NO_SPAWN") == "1", reason="no process spawning here")

STEPS = 3
PROMPTS = ["a red circle on the left", "a blue square at the top"]


def _latents(pipe: Any, guidance: float, prompts: list[str], **call: Any) -> torch.Tensor:
    pipe.set_progress_bar_config(disable=True)
    gens = [torch.Generator().manual_seed(7 + i) for i in range(len(prompts))]
    with torch.no_grad():
        out = pipe(prompts, guidance_scale=guidance, generator=gens, output_type="latent",
                   **{"num_inference_steps": STEPS, **call})  # fmt: skip
    return out.frames if hasattr(out, "frames") else out.images


Call = tuple[float, list[str], dict[str, Any]]  # guidance, prompts, more pipeline arguments


def _rank(rank: int, bundle: str, store: str, out: str, config: dict[str, Any], calls: list[Call]) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        pipe = load(bundle, device="cpu", parallel=ParallelConfig(**config))
        run = pipe.diffkiln_parallel
        for i, (guidance, prompts, more) in enumerate(calls):
            run.split_calls = run.whole_calls = run.rows = run.branch_calls = 0
            torch.save(_latents(pipe, guidance, prompts, **more), Path(out) / f"rank{rank}-{i}.pt")
            counts = {"split": run.split_calls, "whole": run.whole_calls, "rows": run.rows, "world": run.world}
            if run.branch_calls:
                counts["branch"] = run.branch_calls
            (Path(out) / f"rank{rank}-{i}.json").write_text(json.dumps(counts))
    finally:
        dist.destroy_process_group()


def _run_two(bundle: Path, tmp_path: Path, config: dict[str, Any], calls: list[Call]) -> list[tuple[list, list]]:
    """Per call: (the two ranks' latents, their counts)."""

    args = (str(bundle), str(tmp_path / "store"), str(tmp_path), config, calls)
    start_two(_rank, args)
    return [
        ([torch.load(tmp_path / f"rank{r}-{i}.pt", weights_only=True) for r in range(2)],
         [json.loads((tmp_path / f"rank{r}-{i}.json").read_text()) for r in range(2)])
        for i in range(len(calls))
    ]  # fmt: skip


@pytest.fixture(scope="module", params=["unet", "dit"])
def bundle(request: pytest.FixtureRequest, random_shapes_pipelines: dict[str, Any],
           tmp_path_factory: pytest.TempPathFactory) -> Path:  # fmt: skip
    out = tmp_path_factory.mktemp("parallel") / request.param
    return build_bundle(random_shapes_pipelines[request.param], W8A8Config(), out)[0]


def test_cfg_parallel_on_two_ranks_matches_one_process(bundle: Path, tmp_path: Path) -> None:
    single = load(bundle, device="cpu")
    # guidance 5: batch 2 x 2 prompts per call, split in two; guidance off at one prompt: batch 1, whole
    calls: list[Call] = [(5.0, PROMPTS, {}), (1.0, PROMPTS[:1], {})]
    (split, split_counts), (whole, whole_counts) = _run_two(bundle, tmp_path, {"cfg": True}, calls)
    # every rank ends with the whole, identical result (the scheduler ran on the same gathered output)
    assert torch.equal(split[0], split[1])
    assert sqnr_db(_latents(single, 5.0, PROMPTS).numpy(), split[0].numpy()) >= 40.0
    assert split_counts == [{"split": STEPS, "whole": 0, "rows": 2 * STEPS, "world": 2}] * 2
    # a batch that does not divide runs whole on every rank: the same call, bit-identical
    assert torch.equal(whole[0], whole[1])
    assert torch.equal(whole[0], _latents(single, 1.0, PROMPTS[:1]))
    assert whole_counts == [{"split": 0, "whole": STEPS, "rows": 0, "world": 2}] * 2


def test_parallel_without_a_process_group_names_the_fix(bundle: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(RuntimeError, match="torchrun"):
        load(bundle, device="cpu", parallel=ParallelConfig())


WAN_CALL = {"height": 32, "width": 32, "num_frames": 9, "max_sequence_length": 32}


@pytest.fixture(scope="module")
def wan_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from diffkiln.api import OptimizeConfig, optimize

    root = tmp_path_factory.mktemp("parallel-wan")
    config = OptimizeConfig(out=root / "b", recipe=W8A8Config(), calib_size=2, steps=2, progress=False,
                            cache_dir=root / "c")  # fmt: skip
    return optimize("tiny-wan", config)


def test_ulysses_context_parallel_on_two_ranks_matches_one_process(wan_bundle: Path, tmp_path: Path) -> None:
    reference = _latents(load(wan_bundle, device="cpu"), 5.0, PROMPTS[:1], **WAN_CALL)
    ulysses = {"cfg": False, "ulysses_degree": 2}
    [((a, b), counts)] = _run_two(wan_bundle, tmp_path, ulysses, [(5.0, PROMPTS[:1], WAN_CALL)])
    assert torch.equal(a, b)
    assert sqnr_db(reference.numpy(), a.numpy()) >= 40.0
    assert counts == [{"split": 0, "whole": 0, "rows": 0, "world": 2}] * 2  # no batch split: the sequence is


def test_cfg_parallel_gives_each_branch_call_to_one_rank(wan_bundle: Path, tmp_path: Path) -> None:
    # WanPipeline calls the denoiser once per guidance branch, each in diffusers' cache context
    # ("cond", then "uncond"): step 0 runs both on both ranks and shows the pattern; from step 1
    # rank 0 computes "cond" and rank 1 "uncond", and each sends its output to the other.
    reference = _latents(load(wan_bundle, device="cpu"), 5.0, PROMPTS[:1], **WAN_CALL)
    [((a, b), counts)] = _run_two(wan_bundle, tmp_path, {"cfg": True}, [(5.0, PROMPTS[:1], WAN_CALL)])
    assert torch.equal(a, b) and torch.equal(a, reference)  # each branch computed as in one process
    assert counts == [{"split": 0, "whole": 2, "rows": 0, "world": 2, "branch": 2 * (STEPS - 1)}] * 2


WAN22_CALL = {"height": 16, "width": 16, "num_frames": 5, "max_sequence_length": 32}


@pytest.fixture(scope="module")
def experts_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Wan 2.2's two experts, both quantized (tests/matrix/test_expert_split.py)."""
    from tests.matrix.builders import optimized, wan22_experts

    return optimized(wan22_experts, tmp_path_factory.mktemp("parallel-wan22"), WAN22_CALL, calib_size=2, steps=4)[1]


@pytest.mark.parametrize("mode", ["cfg", "ulysses"])
def test_both_experts_run_over_the_ranks(experts_bundle: Path, tmp_path: Path, mode: str) -> None:
    # With 4 steps and boundary 0.6, steps 0-1 run transformer and steps 2-3 transformer_2, each
    # once per guidance branch: CFG parallel gives each branch call to one rank from each expert's
    # own first step on (2 branch calls per expert); Ulysses splits every call's sequence.
    call = {**WAN22_CALL, "num_inference_steps": 4}
    reference = _latents(load(experts_bundle, device="cpu"), 5.0, PROMPTS[:1], **call)
    config = {"cfg": True} if mode == "cfg" else {"cfg": False, "ulysses_degree": 2}
    [((a, b), counts)] = _run_two(experts_bundle, tmp_path, config, [(5.0, PROMPTS[:1], call)])
    assert torch.equal(a, b)
    if mode == "cfg":
        assert torch.equal(a, reference)  # each branch computed as in one process
        assert counts == [{"split": 0, "whole": 4, "rows": 0, "world": 2, "branch": 4}] * 2
    else:
        assert sqnr_db(reference.numpy(), a.numpy()) >= 40.0


VIDEO_CALL = {"height": 64, "width": 64, "num_frames": 16, "max_sequence_length": 24}


@pytest.fixture(scope="module")
def video_bundles(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """W8A8 with a residual cache schedule, and W8A8 with sparse masks, on a random-weight
    shapes-video folder with 4 heads (Ulysses over two ranks needs an even head count), 1,088
    tokens per attention layer."""
    from diffkiln.api import CacheConfig, OptimizeConfig, SparseConfig, optimize
    from diffkiln.zoo.shapes_video_model import assemble_shapes_video, build_video_transformer

    root = tmp_path_factory.mktemp("parallel-video")
    torch.manual_seed(0)
    transformer = build_video_transformer(64, heads=4, layers=4)
    assemble_shapes_video(root / "scratch", transformer=transformer).save_pretrained(root / "pipe")
    cache = CacheConfig(budget=0.5, validate_samples=1, mechanisms=("residual",), refine=0)
    common: dict[str, Any] = {"recipe": W8A8Config(), "calib_size": 2, "steps": STEPS, "progress": False,
                              "call_kwargs": tuple(VIDEO_CALL.items()), "cache_dir": root / "c"}  # fmt: skip
    return {
        "cache": optimize(str(root / "pipe"), OptimizeConfig(out=root / "cache", cache=cache, **common)),
        "sparse": optimize(str(root / "pipe"), OptimizeConfig(out=root / "sparse", sparse=SparseConfig(
            density=0.5, validate_samples=1), **common)),
    }  # fmt: skip


def test_ulysses_with_a_cache_schedule_matches_one_process(video_bundles: dict[str, Path], tmp_path: Path) -> None:
    bundle = video_bundles["cache"]
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["cache"]["mechanism"] == "residual" and not all(manifest["cache"]["compute"])  # some reuse
    reference = _latents(load(bundle, device="cpu"), 5.0, PROMPTS[:1], **VIDEO_CALL)
    ulysses = {"cfg": False, "ulysses_degree": 2}
    [((a, b), _)] = _run_two(bundle, tmp_path, ulysses, [(5.0, PROMPTS[:1], VIDEO_CALL)])
    assert torch.equal(a, b) and torch.equal(a, reference)  # each rank caches its own tokens' residual


def test_ulysses_with_sparse_masks_matches_one_process(video_bundles: dict[str, Path], tmp_path: Path) -> None:
    # Ulysses gives each rank the whole sequence for half the heads: each rank runs its heads' masks.
    bundle = video_bundles["sparse"]
    reference = _latents(load(bundle, device="cpu"), 5.0, PROMPTS[:1], **VIDEO_CALL)
    ulysses = {"cfg": False, "ulysses_degree": 2}
    [((a, b), _)] = _run_two(bundle, tmp_path, ulysses, [(5.0, PROMPTS[:1], VIDEO_CALL)])
    assert torch.equal(a, b)
    assert sqnr_db(reference.numpy(), a.numpy()) >= 60.0  # measured 129.6 dB: float order only


def test_context_parallel_needs_a_context_parallel_plan(bundle: Path, tmp_path: Path) -> None:
    import torch.distributed as dist

    from diffkiln.runtime.parallel import apply_parallel

    pipe = load(bundle, device="cpu")
    denoiser = getattr(pipe, pipe.diffkiln_manifest["pipeline"]["denoiser"])  # UNet2D / SD3: no _cp_plan
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        with pytest.raises(ValueError, match="no context-parallel plan"):
            apply_parallel(denoiser, ParallelConfig(cfg=False, ulysses_degree=2), torch.device("cpu"))
    finally:
        dist.destroy_process_group()


def test_cfg_and_context_parallel_together_are_refused() -> None:
    with pytest.raises(ValueError, match="not supported yet"):
        ParallelConfig(cfg=True, ulysses_degree=2)


def test_ring_attention_with_sparse_masks_is_refused(video_bundles: dict[str, Path]) -> None:
    from diffkiln.core.errors import InvalidInputError

    with pytest.raises(InvalidInputError, match="ring attention splits the sequence inside attention"):
        load(video_bundles["sparse"], device="cpu", parallel=ParallelConfig(cfg=False, ring_degree=2))


@pytest.mark.parametrize("kind", ["cache", "sparse"])
def test_cfg_parallel_per_branch_with_a_cache_schedule_or_masks(
    video_bundles: dict[str, Path], kind: str, tmp_path: Path
) -> None:
    bundle = video_bundles[kind]
    reference = _latents(load(bundle, device="cpu"), 5.0, PROMPTS[:1], **VIDEO_CALL)
    [((a, b), counts)] = _run_two(bundle, tmp_path, {"cfg": True}, [(5.0, PROMPTS[:1], VIDEO_CALL)])
    assert counts[0]["branch"] == 2 * (STEPS - 1)
    assert torch.equal(a, b) and torch.equal(a, reference)
