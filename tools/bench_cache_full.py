"""Cache schedules on full-size random-weight denoisers: the denoising loop's wall time at a
compute fraction of 0.5, side by side with the uncached loop in one process.

For each denoiser (``build_full_denoiser``: the SD1.5 UNet and a DiT): its blocks are found from
one traced call (``diffkiln.calibrate.blocks.find_blocks``, as calibration does), then a loop of
``--steps`` calls (batch 2, as with classifier-free guidance; a new timestep each step) runs
uncached and with each mechanism the layout allows at budget 0.5, computing evenly spaced steps.
The weights are random, so only time is measured here; quality is measured on the trained shapes
models (tools/bench_cache.py). The hooks' own counts give the compute fraction.

Usage: python tools/bench_cache_full.py [--models sd15-unet pixart-alpha] [--steps 10] [--latent 64]
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import torch

from diffkiln.calibrate.blocks import find_blocks
from diffkiln.core.cache_schedule import CacheMechanism, CacheSchedule
from diffkiln.nn.cache import cache_schedule_applied
from diffkiln.optimizer.cache_search import full_steps_allowed, uniform_schedule
from diffkiln.zoo.architectures import build_full_denoiser, full_denoiser_inputs


def _loop(model: torch.nn.Module, calls: list[dict[str, Any]], schedule: CacheSchedule | None) -> tuple[float, Any]:
    with torch.no_grad():
        model(**calls[0])  # warm-up, outside the timing
        if schedule is None:
            t0 = time.perf_counter()
            for c in calls:
                model(**c)
            return time.perf_counter() - t0, None
        with cache_schedule_applied(model, schedule) as run:
            t0 = time.perf_counter()
            for c in calls:
                model(**c)
            return time.perf_counter() - t0, run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["sd15-unet", "pixart-alpha"])
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--latent", type=int, default=64)
    ap.add_argument("--budget", type=float, default=0.5)
    a = ap.parse_args()
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, {a.steps} steps, latent {a.latent}")
    print("| denoiser | mechanism | reused blocks | compute (counted) | loop s | / uncached |")
    print("|---|---|---|---|---|---|")
    for name in a.models:
        torch.manual_seed(0)
        model = build_full_denoiser(name)
        timesteps = [999.0 * (1 - i / a.steps) for i in range(a.steps)]
        calls = [full_denoiser_inputs(name, 2, a.latent, t, seed=i) for i, t in enumerate(timesteps)]
        layout = find_blocks(model, (), calls[0])
        n = len(layout.blocks)
        base, _ = _loop(model, calls, None)
        print(f"| {name} | none | 0 of {n} | 1.000 | {base:.1f} | 1.00x |")
        schedules = [(CacheMechanism.WHOLE, 0, n, (), 0)]
        for blist in layout.lists:
            if blist.residual_capable:
                schedules.append((CacheMechanism.RESIDUAL, blist.start + 1, blist.residual_end, blist.streams,
                                  blist.output_arity))  # fmt: skip
        if n >= 3:
            schedules.append((CacheMechanism.DEEP, 1, n - 1, (), 0))
        for mechanism, start, end, streams, arity in schedules:
            k = full_steps_allowed(a.steps, n, end - start, a.budget)
            if k < 1:
                continue
            for label, compute in (
                (mechanism.value, uniform_schedule(a.steps, k)),
                (f"{mechanism.value}, every step computing (hook overhead)", (True,) * a.steps),
            ):
                schedule = CacheSchedule(mechanism, layout.blocks, start, end, compute, 1, streams, arity)
                seconds, run = _loop(model, calls, schedule)
                print(f"| {name} | {label} | {end - start} of {n} | {run.compute_fraction:.3f} | {seconds:.1f} | "
                      f"{seconds / base:.3f}x |")  # fmt: skip
        del model


if __name__ == "__main__":
    main()
