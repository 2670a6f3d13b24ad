"""The cache and mask searches' candidate validations dealt over two gloo processes: each rank
validates its share, the scores are gathered, and the plan (the chosen schedule or masks, and the
table of every validated candidate) is the single-process one. Spawns processes: skipped where
that is not possible (``DIFFKILN_NO_SPAWN=1``)."""

from __future__ import annotations

import json
import os
from datetime import timedelta
from pathlib import Path

import pytest
import torch

from diffkiln.api import CacheConfig, OptimizeConfig, SparseConfig, optimize
from diffkiln.zoo.shapes_video_model import VIDEO_TEXT_LENGTH, assemble_shapes_video
from tests.two_ranks import start_two

pytestmark = pytest.mark.skipif(os.environ.get("DIFFKILN_NO_SPAWN") == "1", reason="no process spawning here")

# The masks need long attention: a random-weight folder of the shapes-video architecture
# (1,088 tokens per attention layer), at 16 frames.
VIDEO_KW = (("height", 64), ("width", 64), ("num_frames", 16), ("max_sequence_length", VIDEO_TEXT_LENGTH))


def _config(recipe: str, out: Path, cache: Path) -> OptimizeConfig:
    if recipe == "cache":
        return OptimizeConfig(out=out, recipe=CacheConfig(budget=0.5, validate_samples=1, refine=0), calib_size=2,
                              steps=6, progress=False, cache_dir=cache)  # fmt: skip
    return OptimizeConfig(out=out, recipe=SparseConfig(density=0.5, validate_samples=1), calib_size=2, steps=3,
                          call_kwargs=VIDEO_KW, progress=False, cache_dir=cache)  # fmt: skip


def _target(recipe: str, tmp: Path) -> str:
    if recipe == "cache":
        return "shapes-dit"
    folder = tmp / "video-pipe"
    if not folder.is_dir():
        torch.manual_seed(0)
        assemble_shapes_video(tmp / "scratch").save_pretrained(folder)
    return str(folder)


def _rank(rank: int, store: str, recipe: str, target: str, out: str, cache: str) -> None:
    import torch.distributed as dist

    from diffkiln.core import distributed

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2,
                            timeout=timedelta(seconds=120))  # fmt: skip
    calls: list[tuple[int, int]] = []  # (this rank's share, all items) per sharded map
    original = distributed.sharded_map

    def counted(fn, items, progress=None):  # type: ignore[no-untyped-def]
        calls.append((len(range(rank, len(items), 2)), len(items)))
        return original(fn, items, progress)

    for module in ("diffkiln.optimizer.cache_search", "diffkiln.optimizer.sparse_search"):
        __import__(module, fromlist=["x"]).sharded_map = counted
    try:
        optimize(target, _config(recipe, Path(out) / "bundle", Path(cache)))
        (Path(out) / f"share-{rank}.json").write_text(json.dumps(calls))
    finally:
        dist.destroy_process_group()


def _section(bundle: Path, recipe: str) -> dict:
    manifest = json.loads((bundle / "manifest.json").read_text())
    section: dict = manifest["cache" if recipe == "cache" else "sparsity"]
    section.get("search", {}).pop("seconds", None)  # wall time differs; everything else must not
    return section


@pytest.mark.parametrize("recipe", ["cache", "sparse"])
def test_sharded_validations_give_the_single_process_plan(recipe: str, tmp_path: Path) -> None:

    torch.set_num_threads(1)
    target = _target(recipe, tmp_path)
    single = optimize(target, _config(recipe, tmp_path / "single", tmp_path / "cache-single"))
    out = tmp_path / "two"
    args = (str(tmp_path / "store"), recipe, target, str(out), str(tmp_path / "cache-two"))
    start_two(_rank, args)
    assert _section(out / "bundle", recipe) == _section(single, recipe)
    shares = [json.loads((out / f"share-{r}.json").read_text()) for r in range(2)]
    # Every map was dealt over both ranks (sparse: the proposals' integer programs, then the
    # validations; cache: the validations); the last one covered every validated candidate.
    for (mine, total), (theirs, total_again) in zip(shares[0], shares[1], strict=True):
        assert total == total_again and mine + theirs == total and mine > 0 and theirs > 0, shares
    assert shares[0][-1][1] == len(_section(single, recipe)["search"]["validated"])
