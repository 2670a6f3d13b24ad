"""Calibration sharded over two gloo processes: the batches are dealt over the ranks and the
statistics merge into exactly those of one process that ran every batch (every tensor of the saved
file, bit for bit), with cache and attention proxies included. Spawns processes: skipped where
that is not possible (``DIFFKILN_NO_SPAWN=1``)."""

from __future__ import annotations

import json
import os
from datetime import timedelta
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from diffkiln.calibrate import CalibrationConfig, calibrate
from diffkiln.generation import load_pipeline
from tests.two_ranks import start_two

pytestmark = pytest.mark.skipif(os.environ.get("DIFFKILN_NO_SPAWN") == "1", reason="no process spawning here")

PROMPTS = ("a red circle on the left", "a blue square at the top", "a green triangle on the right")


WAN22_CALL = (("height", 16), ("width", 16), ("num_frames", 5), ("max_sequence_length", 32))


def _config(cache: Path, experts: bool = False) -> CalibrationConfig:
    # Three batches of one: rank 0 runs batches 0 and 2, rank 1 batch 1. A denoiser with experts
    # runs at only some steps: no cache or attention proxies (calibration refuses them).
    if experts:
        return CalibrationConfig(PROMPTS, steps=4, batch_size=1, cache_dir=cache, progress=False,
                                 call_kwargs=WAN22_CALL)  # fmt: skip
    return CalibrationConfig(PROMPTS, steps=3, batch_size=1, cache_dir=cache, progress=False, cache_stats=True,
                             attention_stats=True, attention_block=16)  # fmt: skip


def _rank(rank: int, store: str, target: str, cache: str, experts: bool = False) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2,
                            timeout=timedelta(seconds=120))  # fmt: skip
    try:
        stats = calibrate(load_pipeline(target), _config(Path(cache), experts))
        summary = {"timesteps": list(stats.timesteps), "layers": sorted(stats.layers),
                   "samples": [stats.layers[k].samples.sum().item() for k in sorted(stats.layers)]}  # fmt: skip
        (Path(cache).parent / f"rank-{rank}.json").write_text(json.dumps(summary))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("target", ["shapes-dit", "tiny-sd15"])
def test_two_ranks_give_the_single_process_statistics(target: str, tmp_path: Path) -> None:

    torch.set_num_threads(1)
    calibrate(load_pipeline(target), _config(tmp_path / "one"))
    start_two(_rank, (str(tmp_path / "store"), target, str(tmp_path / "two")))
    (one,) = (tmp_path / "one").glob("calib-*.safetensors")
    (two,) = (tmp_path / "two").glob("calib-*.safetensors")  # rank 0 alone wrote the cache
    assert one.name == two.name
    a, b = load_file(str(one)), load_file(str(two))
    assert a.keys() == b.keys() and len(a) > 50
    for key in a:
        assert torch.equal(a[key], b[key]), key
    ranks = [json.loads((tmp_path / f"rank-{r}.json").read_text()) for r in range(2)]
    assert ranks[0] == ranks[1]  # both ranks hold the merged statistics


def test_two_ranks_record_a_denoiser_and_its_experts_as_one_process(tmp_path: Path) -> None:
    """Wan 2.2's two experts, recorded in one run: each rank's share of the batches merges into
    the single process's statistics of both (each expert's cached as its own)."""
    from tests.matrix.builders import save_built, wan22_experts

    target = str(save_built(wan22_experts, tmp_path / "wan22"))
    torch.set_num_threads(1)
    calibrate(load_pipeline(target), _config(tmp_path / "one", experts=True))
    start_two(_rank, (str(tmp_path / "store"), target, str(tmp_path / "two"), True))
    one = sorted((tmp_path / "one").glob("calib-*.safetensors"))
    two = sorted((tmp_path / "two").glob("calib-*.safetensors"))
    assert len(one) == 2 and [f.name for f in one] == [f.name for f in two]  # the denoiser's and the expert's
    for f, g in zip(one, two, strict=True):
        a, b = load_file(str(f)), load_file(str(g))
        assert a.keys() == b.keys() and len(a) > 20
        for key in a:
            assert torch.equal(a[key], b[key]), (f.name, key)
