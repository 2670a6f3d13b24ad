"""The mixed recipe's sensitivity search sharded over two gloo processes: a rank that dies fails
the run naming it and leaves no bundle, and a re-run reuses the trials the dead run finished,
computes the rest sharded and gives one process's plan. Spawns processes: skipped where that is not
possible (``DIFFKILN_NO_SPAWN=1``)."""

from __future__ import annotations

import json
import os
from datetime import timedelta
from pathlib import Path

import pytest
import torch

from diffkiln.api import MixedConfig, OptimizeConfig, optimize, sensitivity
from tests.two_ranks import start_two

pytestmark = pytest.mark.skipif(os.environ.get("DIFFKILN_NO_SPAWN") == "1", reason="no process spawning here")

TARGET = "tiny-sd15"


def _config(out: Path, cache: Path) -> OptimizeConfig:
    recipe = MixedConfig(avg_weight_bits=4.0, splits=1, sensitivity_prompts=2, quality_steps=2)
    return OptimizeConfig(out=out, recipe=recipe, calib_size=2, steps=2, progress=False, cache_dir=cache)


def _rank(rank: int, store: str, out: str, cache: str, die_after: int) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2,
                            timeout=timedelta(seconds=60))  # fmt: skip
    try:
        if die_after and rank == 1:
            # a rank that stops mid-search: after ``die_after`` trials of its shard are on disk
            from diffkiln.optimizer.sensitivity import SensitivityEntry

            seen = {"n": 0}
            original = SensitivityEntry.__init__

            def counting(self: SensitivityEntry, *a: object, **k: object) -> None:
                original(self, *a, **k)
                seen["n"] += 1
                if seen["n"] > die_after:
                    os._exit(3)

            SensitivityEntry.__init__ = counting  # type: ignore[method-assign]
        table, _, _ = sensitivity(TARGET, _config(Path(out), Path(cache)))
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / f"table-{rank}.json").write_text(json.dumps({"reused": table.reused, "ranks": table.ranks}))
        optimize(TARGET, _config(Path(out) / "bundle", Path(cache)))
    finally:
        dist.destroy_process_group()


def _spawn(tmp: Path, out: Path, cache: Path, die_after: int = 0) -> None:

    store = tmp / f"store-{out.name}-{die_after}"
    start_two(_rank, (str(store), str(out), str(cache), die_after))


def _plan(bundle: Path) -> dict:
    plan: dict = json.loads((bundle / "manifest.json").read_text())["plan"]
    return plan


def test_a_dead_rank_fails_the_run_and_the_rerun_gives_the_single_process_plan(tmp_path: Path) -> None:
    from torch.multiprocessing import ProcessExitedException

    torch.set_num_threads(1)
    single = optimize(TARGET, _config(tmp_path / "single", tmp_path / "cache-single"))
    with pytest.raises(ProcessExitedException, match="process 1 terminated with exit code 3"):
        _spawn(tmp_path, tmp_path / "dead", tmp_path / "cache", die_after=3)
    assert not (tmp_path / "dead" / "bundle").exists()  # nothing half-written
    shards = sorted(p.name.rsplit(".", 2)[-2] for p in (tmp_path / "cache" / "sensitivity").glob("*.jsonl"))
    assert shards == ["shard-0", "shard-1"]  # each rank wrote its own results, the dead one its first trials
    # The rerun reuses the trials the dead run finished, computes the rest sharded, and gives the
    # plan of one process.
    _spawn(tmp_path, tmp_path / "rerun", tmp_path / "cache")
    tables = [json.loads((tmp_path / "rerun" / f"table-{r}.json").read_text()) for r in range(2)]
    assert tables[0] == tables[1] and tables[0]["reused"] >= 3 and tables[0]["ranks"] == 2, tables
    assert _plan(tmp_path / "rerun" / "bundle") == _plan(single)
