"""CFG parallel against one process, side by side in one run: the same W8A8 bundle generated with
one process, then with ``torchrun --nproc-per-node N`` and ``load(..., parallel=ParallelConfig())``,
each process on its own core (``OMP_NUM_THREADS=1``). Reports seconds per image batch, the
speed-up, the split calls and the latent SQNR of the parallel run against the single one.

Usage: python tools/bench_cfg_parallel.py [--model shapes-dit] [--steps 20] [--batch 2] [--repeat 3]
    [--nproc 2] [--bundle B]

Writes ``tools/results/bench_cfg_parallel_MODEL.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from rank_launch import run_ranks  # a sibling tool module (tools/rank_launch.py)

from diffkiln.api import OptimizeConfig, optimize
from diffkiln.core.metrics import sqnr_db
from diffkiln.optimizer import W8A8Config
from diffkiln.runtime import ParallelConfig, load

RESULTS = Path(__file__).resolve().parent / "results"
PROMPTS = ["a red circle on the left", "a blue square at the top", "a green triangle", "a yellow circle"]


def _generate(pipe: Any, steps: int, batch: int, call: dict[str, Any]) -> torch.Tensor:
    pipe.set_progress_bar_config(disable=True)
    gens = [torch.Generator().manual_seed(i) for i in range(batch)]
    with torch.no_grad():
        out = pipe(PROMPTS[:batch], num_inference_steps=steps, generator=gens, output_type="latent", **call)
    return out.frames if hasattr(out, "frames") else out.images


def worker(a: argparse.Namespace) -> None:
    """One rank (or the single process): generate ``repeat`` times after a warm-up; rank 0 writes
    the timings and latents."""
    torch.set_num_threads(1)
    parallel = ParallelConfig() if int(os.environ.get("WORLD_SIZE", "1")) > 1 else None
    pipe = load(a.bundle, device="cpu", parallel=parallel)
    call = json.loads(a.call_args)
    _generate(pipe, a.steps, a.batch, call)  # warm-up
    times = []
    for _ in range(a.repeat):
        if parallel is not None:
            import torch.distributed as dist

            dist.barrier()
        t0 = time.perf_counter()
        latents = _generate(pipe, a.steps, a.batch, call)
        times.append(time.perf_counter() - t0)
    run = pipe.diffkiln_parallel
    if run is None or run.rank == 0:
        torch.save(latents, a.out.with_suffix(".pt"))
        info = {"seconds": min(times), "all_seconds": times,
                "split_calls": run.split_calls if run else 0, "whole_calls": run.whole_calls if run else 0,
                "branch_calls": run.branch_calls if run else 0}  # fmt: skip
        a.out.write_text(json.dumps(info))


def _launch(a: argparse.Namespace, bundle: Path, nproc: int, out: Path) -> dict[str, Any]:
    args = [__file__, "--worker", "--bundle", str(bundle), "--out", str(out), "--steps", str(a.steps),
            "--batch", str(a.batch), "--repeat", str(a.repeat), "--call-args", a.call_args]  # fmt: skip
    run_ranks(args, nproc)
    result: dict[str, Any] = json.loads(out.read_text())
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="shapes-dit")
    ap.add_argument("--bundle", type=Path, help="a bundle to run (default: build W8A8 of --model)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch", type=int, default=2, help="prompts per call (CFG doubles the denoiser batch)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--call-args", default="{}", help="pipeline-call arguments as JSON, e.g. '{\"num_frames\": 9}'")
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        worker(a)
        return
    tmp = Path(tempfile.mkdtemp(prefix="cfgpar-"))
    call = tuple(json.loads(a.call_args).items())
    bundle = a.bundle or optimize(a.model, OptimizeConfig(out=tmp / "bundle", recipe=W8A8Config(), progress=False,
                                                          call_kwargs=call))  # fmt: skip
    one = _launch(a, bundle, 1, tmp / "one.json")
    many = _launch(a, bundle, a.nproc, tmp / "many.json")
    ref, par = torch.load(tmp / "one.pt", weights_only=True), torch.load(tmp / "many.pt", weights_only=True)
    record = {
        "model": a.model if a.bundle is None else str(a.bundle),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, one thread per process",
        "steps": a.steps,
        "prompts": a.batch,
        "nproc": a.nproc,
        "one_process_s": round(one["seconds"], 3),
        "parallel_s": round(many["seconds"], 3),
        "speedup": round(one["seconds"] / many["seconds"], 3),
        "split_calls": many["split_calls"],
        "whole_calls": many["whole_calls"],
        "branch_calls": many.get("branch_calls", 0),
        "call_args": json.loads(a.call_args),
        "latent_sqnr_db": round(float(sqnr_db(ref.numpy(), par.numpy())), 2),
        "bit_identical": bool(torch.equal(ref, par)),
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"bench_cfg_parallel_{Path(record['model']).name}.json").write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
