"""Calibration on one process against ``torchrun --nproc-per-node N``, side by side in one run, each
process on its own core (``OMP_NUM_THREADS=1``), each with an empty calibration cache: the wall
time of ``calibrate`` and whether the saved statistics are identical, tensor for tensor.

Usage: python tools/bench_distributed_calibration.py [--model shapes-unet] [--prompts 16] [--batch 4]

Writes ``tools/results/bench_distributed_calibration_MODEL.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

from rank_launch import run_ranks  # a sibling tool module (tools/rank_launch.py)

from diffkiln.calibrate import CalibrationConfig, calibrate
from diffkiln.calibrate.prompts import generic_prompts
from diffkiln.generation import load_pipeline
from diffkiln.zoo.registry import resolve_target

RESULTS = Path(__file__).resolve().parent / "results"


def worker(a: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(1)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        import torch.distributed as dist

        dist.init_process_group("gloo")
    builtin = resolve_target(a.model).builtin
    prompts = (builtin.calibration_prompts(a.prompts) if builtin else None) or generic_prompts(a.prompts)
    pipe = load_pipeline(a.model)
    config = CalibrationConfig(tuple(prompts), steps=a.steps, batch_size=a.batch, cache_dir=a.cache, progress=False)
    t0 = time.perf_counter()
    calibrate(pipe, config)
    if int(os.environ.get("RANK", "0")) == 0:
        a.out.write_text(json.dumps({"seconds": time.perf_counter() - t0}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="shapes-unet")
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--cache", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        worker(a)
        return
    from safetensors.torch import load_file

    tmp = Path(tempfile.mkdtemp(prefix="distcalib-"))
    resolve_target(a.model)  # a random-weight built-in is built once, before the runs
    seconds, files = {}, {}
    for label, n in (("one", 1), ("many", a.nproc)):
        cache, out = tmp / label, tmp / f"{label}.json"
        args = [__file__, "--worker", "--model", a.model, "--prompts", str(a.prompts), "--batch", str(a.batch),
                "--steps", str(a.steps), "--cache", str(cache), "--out", str(out)]  # fmt: skip
        run_ranks(args, n)
        seconds[label] = json.loads(out.read_text())["seconds"]
        (files[label],) = cache.glob("calib-*.safetensors")
    one, many = load_file(str(files["one"])), load_file(str(files["many"]))
    identical = one.keys() == many.keys() and all(bool((one[k] == many[k]).all()) for k in one)
    result = {"model": a.model, "nproc": a.nproc, "prompts": a.prompts, "batch": a.batch, "steps": a.steps,
              "seconds_one": round(seconds["one"], 2), "seconds_many": round(seconds["many"], 2),
              "ratio": round(seconds["many"] / seconds["one"], 3), "identical": identical}  # fmt: skip
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"bench_distributed_calibration_{a.model}.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
