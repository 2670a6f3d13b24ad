"""The mixed recipe's sensitivity search on one process against ``torchrun --nproc-per-node N``,
side by side in one run, each process on its own core (``OMP_NUM_THREADS=1``). The calibration is
done once first and shared (copied) so both runs time the search alone; the sensitivity cache starts
empty for each. Reports the wall time of each, the ratio, and whether the tables are identical.

Usage: python tools/bench_distributed_search.py [--model shapes-unet] [--nproc 2] [--prompts 4]

Writes ``tools/results/bench_distributed_search_MODEL.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

from rank_launch import run_ranks  # a sibling tool module (tools/rank_launch.py)

from diffkiln.api import MixedConfig, OptimizeConfig, sensitivity

RESULTS = Path(__file__).resolve().parent / "results"


def _config(a: argparse.Namespace, cache: Path) -> OptimizeConfig:
    recipe = MixedConfig(avg_weight_bits=4.0, sensitivity_prompts=a.prompts, quality_steps=a.quality_steps)
    return OptimizeConfig(out=cache / "unused", recipe=recipe, progress=False, cache_dir=cache)


def worker(a: argparse.Namespace) -> None:
    """One rank (or the single process): the search; rank 0 writes its table and seconds."""
    import torch

    torch.set_num_threads(1)
    t0 = time.perf_counter()
    table, seconds, _ = sensitivity(a.model, _config(a, a.cache))
    if int(os.environ.get("RANK", "0")) == 0:
        entries = [[e.layer, e.target, e.bits, e.error] for e in table.entries]
        a.out.write_text(json.dumps({"seconds": seconds, "wall": time.perf_counter() - t0, "entries": entries,
                                     "trials": len(entries), "ranks": table.ranks}))  # fmt: skip


def _launch(a: argparse.Namespace, cache: Path, nproc: int, out: Path) -> dict:
    args = [__file__, "--worker", "--model", a.model, "--cache", str(cache), "--out", str(out),
            "--prompts", str(a.prompts), "--quality-steps", str(a.quality_steps)]  # fmt: skip
    run_ranks(args, nproc)
    result: dict = json.loads(out.read_text())
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="shapes-unet")
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--prompts", type=int, default=4, help="calibration samples per sensitivity trial")
    ap.add_argument("--quality-steps", type=int, default=5)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--cache", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        worker(a)
        return
    tmp = Path(tempfile.mkdtemp(prefix="distsearch-"))
    base = tmp / "calibrated"
    a.cache = base
    warm = _config(a, base)  # calibrate once: the runs below time the search alone
    sensitivity(a.model, OptimizeConfig(out=warm.out, recipe=MixedConfig(avg_weight_bits=4.0, sensitivity_prompts=1,
                                                                         quality_steps=1), progress=False,
                                        cache_dir=base))  # fmt: skip
    shutil.rmtree(base / "sensitivity", ignore_errors=True)
    results = {}
    for label, n in (("one", 1), ("many", a.nproc)):
        cache = tmp / label
        shutil.copytree(base, cache)
        results[label] = _launch(a, cache, n, tmp / f"{label}.json")
    one, many = results["one"], results["many"]
    record = {
        "model": a.model,
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, one thread per process",
        "nproc": a.nproc,
        "trials": one["trials"],
        "one_process_s": round(one["seconds"], 1),
        "sharded_s": round(many["seconds"], 1),
        "ratio": round(many["seconds"] / one["seconds"], 3),
        "identical_tables": one["entries"] == many["entries"],
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"bench_distributed_search_{a.model}.json").write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
