"""Measuring cache schedules by really sampling: the final latents of calibration samples (with
their seeds) against the uncached run, and a local search over computing steps on that measure.

The measure is the SQNR (dB) of the final latents, pooled over the samples; latents are compared
before the VAE, which no schedule touches, so nothing decodes. The local search starts from the best schedule
by proxy and validation and moves one computing step at a time (by one or two steps, either way),
keeping a move when the measure improves, until no move helps or the trial budget is spent.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch

from diffkiln.calibrate.stats import CalibrationStats
from diffkiln.core.cache_schedule import CacheSchedule
from diffkiln.core.metrics import sqnr_db
from diffkiln.core.pipelines import find_denoiser
from diffkiln.nn.cache import cache_schedule_applied
from diffkiln.optimizer.workload import CalibrationCalls, output_tensor

__all__ = ["LatentRun", "longest_reuse", "refine"]


class LatentRun:
    """The pipeline on the first ``samples`` calibration samples, final latents out."""

    def __init__(self, pipe: Any, stats: CalibrationStats, samples: int) -> None:
        self.pipe = pipe
        self.sampling = CalibrationCalls.of(pipe, stats, samples, output_type="latent")
        self.samples = self.sampling.samples
        self.denoiser = find_denoiser(pipe, stats.denoiser or None)
        pipe.set_progress_bar_config(disable=True)
        self.reference = self._run()

    def _run(self) -> torch.Tensor:
        return output_tensor(self.sampling.run(self.pipe))

    def sqnr_under(self, applied: Callable[[], Any]) -> float:
        """Latent SQNR (dB, pooled over the samples, capped at 200) of a run inside the context
        manager ``applied()`` returns, against the reference run."""
        with applied():
            got = self._run()
        return min(sqnr_db(self.reference.numpy(), got.numpy()), 200.0)

    def score(self, schedule: CacheSchedule) -> tuple[float, float]:
        """(latent SQNR in dB against the uncached run, pooled over the samples; compute fraction counted)."""
        with cache_schedule_applied(self.denoiser, schedule, getattr(self.pipe, "scheduler", None)) as run:
            got = self._run()
        # Pooled over samples: one sample whose layout moved (a content change) weighs as its error
        # energy, where a mean of per-sample dB would hide it among the others.
        return min(sqnr_db(self.reference.numpy(), got.numpy()), 200.0), float(run.compute_fraction or 0.0)


def longest_reuse(compute: tuple[bool, ...]) -> int:
    """The longest run of reusing steps."""
    longest = run = 0
    for c in compute:
        run = 0 if c else run + 1
        longest = max(longest, run)
    return longest


def _moves(compute: tuple[bool, ...], max_run: int | None = None) -> list[tuple[bool, ...]]:
    """Schedules with one computing step (never step 0) moved by one or two steps, either way,
    keeping runs of reusing steps at most ``max_run`` long."""
    out = []
    for t, c in enumerate(compute):
        if not c or t == 0:
            continue
        for d in (-1, 1, -2, 2):
            u = t + d
            if 0 < u < len(compute) and not compute[u]:
                moved = list(compute)
                moved[t], moved[u] = False, True
                if max_run is None or longest_reuse(tuple(moved)) <= max_run:
                    out.append(tuple(moved))
    return out


def refine(start: CacheSchedule, score: float, measure: Callable[[CacheSchedule], tuple[float, float]],
           trials: int, max_run: int | None = None) -> tuple[CacheSchedule, float, list[dict[str, Any]]]:  # fmt: skip
    """Hill-climb from ``start`` (measured ``score``) for at most ``trials`` measurements, keeping
    runs of reusing steps at most ``max_run`` long.

    Returns:
        (the best schedule, its score, one row per trial).
    """
    best, best_score = start, score
    rows: list[dict[str, Any]] = []
    improved = True
    while improved and len(rows) < trials:
        improved = False
        for compute in _moves(best.compute, max_run):
            if len(rows) >= trials:
                break
            candidate = dataclasses.replace(best, compute=compute)
            value, fraction = measure(candidate)
            rows.append({"schedule": "local move", "score": round(value, 4), "compute_fraction": round(fraction, 4),
                         "compute": candidate.pattern})  # fmt: skip
            if value > best_score + 1e-6:
                best, best_score, improved = candidate, value, True
                break
    return best, best_score, rows
