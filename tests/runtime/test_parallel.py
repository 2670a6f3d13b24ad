"""CFG parallel over two gloo processes: each rank runs half of every batched denoiser call, and the
latents match one process (SD1.5- and SD3-class W8A8 bundles); a call whose batch does not divide
runs whole on both ranks. Spawns processes: skipped where that is not possible
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

pytestmark = pytest.mark.skipif(os.environ.get("DIFFKILN_NO_SPAWN") == "1", reason="no process spawning here")

STEPS = 3
PROMPTS = ["a red circle on the left", "a blue square at the top"]


def _latents(pipe: Any, guidance: float, prompts: list[str]) -> torch.Tensor:
    pipe.set_progress_bar_config(disable=True)
    gens = [torch.Generator().manual_seed(7 + i) for i in range(len(prompts))]
    with torch.no_grad():
        return pipe(prompts, num_inference_steps=STEPS, guidance_scale=guidance, generator=gens,
                    output_type="latent").images  # fmt: skip


def _rank(rank: int, bundle: str, store: str, out: str, guidance: float, prompts: list[str]) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        pipe = load(bundle, device="cpu", parallel=ParallelConfig(cfg=True))
        latents = _latents(pipe, guidance, prompts)
        run = pipe.diffkiln_parallel
        torch.save(latents, Path(out) / f"rank{rank}.pt")
        counts = {"split": run.split_calls, "whole": run.whole_calls, "rows": run.rows, "world": run.world}
        (Path(out) / f"rank{rank}.json").write_text(json.dumps(counts))
    finally:
        dist.destroy_process_group()


def _run_two(
    bundle: Path, tmp_path: Path, guidance: float, prompts: list[str]
) -> tuple[list[torch.Tensor], list[dict]]:
    import torch.multiprocessing as mp

    mp.start_processes(_rank, args=(str(bundle), str(tmp_path / "store"), str(tmp_path), guidance, prompts),
                       nprocs=2, join=True, start_method="spawn")  # fmt: skip
    latents = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    counts = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    return latents, counts


@pytest.fixture(scope="module", params=["unet", "dit"])
def bundle(request: pytest.FixtureRequest, random_shapes_pipelines: dict[str, Any],
           tmp_path_factory: pytest.TempPathFactory) -> Path:  # fmt: skip
    out = tmp_path_factory.mktemp("parallel") / request.param
    return build_bundle(random_shapes_pipelines[request.param], W8A8Config(), out)[0]


def test_cfg_parallel_on_two_ranks_matches_one_process(bundle: Path, tmp_path: Path) -> None:
    reference = _latents(load(bundle, device="cpu"), 5.0, PROMPTS)
    (a, b), counts = _run_two(bundle, tmp_path, 5.0, PROMPTS)
    # every rank ends with the whole, identical result (the scheduler ran on the same gathered output)
    assert torch.equal(a, b)
    assert sqnr_db(reference.numpy(), a.numpy()) >= 40.0
    # each of the STEPS calls had batch 2 x 2 prompts, split in two: 2 rows per rank per call
    assert counts == [{"split": STEPS, "whole": 0, "rows": 2 * STEPS, "world": 2}] * 2


def test_a_batch_that_does_not_divide_runs_whole_on_every_rank(bundle: Path, tmp_path: Path) -> None:
    prompts = PROMPTS[:1]
    reference = _latents(load(bundle, device="cpu"), 1.0, prompts)  # guidance off: batch 1
    (a, b), counts = _run_two(bundle, tmp_path, 1.0, prompts)
    assert torch.equal(a, b)
    assert torch.equal(a, reference)  # the same call on every rank: bit-identical
    assert counts == [{"split": 0, "whole": STEPS, "rows": 0, "world": 2}] * 2


def test_parallel_without_a_process_group_names_the_fix(bundle: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(RuntimeError, match="torchrun"):
        load(bundle, device="cpu", parallel=ParallelConfig())
