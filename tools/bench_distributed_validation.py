"""The cache and mask searches on one process against ``torchrun --nproc-per-node N``, side by side in
one run, each process on its own core (``OMP_NUM_THREADS=1``): the wall time of the search itself
(the ``search.seconds`` the bundle records) and whether the chosen schedule or masks are identical.
The calibration is done once first and copied to each run.

Usage: python tools/bench_distributed_validation.py [--recipe cache|sparse] [--nproc 2]

cache: shapes-dit, budget 0.5, up to the 8 best schedules by proxy and the retention variants on 12
samples, no refinement (the refinement's moves are sequential and run on every rank). sparse: a random-weight folder of
the shapes-video architecture (1,088 tokens per attention layer), density 0.35, 2 validation
samples.
Writes ``tools/results/bench_distributed_validation_RECIPE.json``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

from rank_launch import run_ranks  # a sibling tool module (tools/rank_launch.py)

from diffkiln.api import CacheConfig, OptimizeConfig, SparseConfig, optimize

RESULTS = Path(__file__).resolve().parent / "results"
VIDEO_KW = (("height", 64), ("width", 64), ("num_frames", 16), ("max_sequence_length", 24))


def _config(recipe: str, out: Path, cache: Path) -> OptimizeConfig:
    if recipe == "cache":
        recipe = CacheConfig(budget=0.5, validate=8, validate_samples=12, refine=0)
        return OptimizeConfig(out=out, recipe=recipe, calib_size=12, steps=20, progress=False, cache_dir=cache,
                              overwrite=True)  # fmt: skip
    return OptimizeConfig(out=out, recipe=SparseConfig(density=0.35, validate_samples=2), calib_size=2, steps=4,
                          call_kwargs=VIDEO_KW, progress=False, cache_dir=cache, overwrite=True)  # fmt: skip


def worker(a: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(1)
    optimize(a.target, _config(a.recipe, a.out, a.cache))


def _launch(a: argparse.Namespace, target: str, cache: Path, out: Path, nproc: int) -> dict:
    args = [__file__, "--worker", "--recipe", a.recipe, "--target", target, "--cache", str(cache), "--out", str(out)]
    run_ranks(args, nproc)
    manifest = json.loads((out / "manifest.json").read_text())
    section: dict = manifest["cache" if a.recipe == "cache" else "sparsity"]
    return section


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", choices=["cache", "sparse"], default="cache")
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--target", help=argparse.SUPPRESS)
    ap.add_argument("--cache", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        worker(a)
        return
    tmp = Path(tempfile.mkdtemp(prefix="distvalidate-"))
    target = "shapes-dit"
    if a.recipe == "sparse":
        import torch

        from diffkiln.zoo.shapes_video_model import assemble_shapes_video

        torch.manual_seed(0)
        target = str(tmp / "video-pipe")
        assemble_shapes_video(tmp / "scratch").save_pretrained(target)
    base = tmp / "calibrated"
    optimize(target, _config(a.recipe, tmp / "warm", base))  # calibrate once; the runs below reuse it
    sections = {}
    for label, n in (("one", 1), ("many", a.nproc)):
        cache = tmp / label
        shutil.copytree(base, cache)
        sections[label] = _launch(a, target, cache, tmp / f"out-{label}", n)
    seconds = {k: v["search"].pop("seconds") for k, v in sections.items()}
    result = {
        "recipe": a.recipe,
        "nproc": a.nproc,
        "validated": len(sections["one"]["search"]["validated"]),
        "seconds_one": seconds["one"],
        "seconds_many": seconds["many"],
        "ratio": round(seconds["many"] / seconds["one"], 3),
        "identical": sections["one"] == sections["many"],
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"bench_distributed_validation_{a.recipe}.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
