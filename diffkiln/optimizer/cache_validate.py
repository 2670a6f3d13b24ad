"""Measuring cache schedules by really sampling: the final latents of calibration samples (with
their seeds) against the uncached run, and a local search over computing steps on that measure.

The measure (:func:`worst_sample_sqnr`) is the *worst sample's* SQNR (dB) of the final latents,
averaged over a pyramid of scales, from full resolution down to each channel's mean. Latents are
compared before the VAE, which no schedule touches, so nothing decodes. Why not the SQNR pooled over
the samples: measured on shapes-dit at a budget of 0.35, schedules that reuse the last four to six
steps keep a pooled SQNR above 16 dB yet turn a fifth of the shapes another colour (a green square
decodes blue): the error is a drift of a channel's mean in a few samples, small in energy against
the whole batch. Of six schedules measured there on 150 judged prompts, this measure put the four
judged at 0.95 or more above the two judged at 0.83 and less; the pooled SQNR put those two first.

The local search starts from the best schedule by proxy and validation and moves one computing step
at a time (by one or two steps, either way), keeping a move when the measure improves, until no
move helps or the trial budget is spent.
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

__all__ = ["LatentRun", "longest_reuse", "refine", "worst_sample_sqnr"]

_CAP_DB = 200.0
"""SQNR given to an exact match (no error), so that scores stay finite."""


def _per_sample_sqnr(reference: torch.Tensor, test: torch.Tensor) -> torch.Tensor:
    ref, err = reference.flatten(1), (reference - test).flatten(1)
    signal, noise = (ref**2).sum(1), (err**2).sum(1)
    db = 10 * torch.log10(signal.clamp_min(1e-30) / noise.clamp_min(1e-30))
    return torch.where(noise == 0, torch.full_like(db, _CAP_DB), db.clamp(max=_CAP_DB))


def _coarser(x: torch.Tensor) -> torch.Tensor | None:
    """``x`` averaged over 2 x 2 patches of its last two dimensions (the last one for 3-d
    tensors: audio), or None when nothing is left to average."""
    if x.dim() >= 4 and max(x.shape[-2:]) > 1:
        flat = x.reshape(x.shape[0], -1, *x.shape[-2:])
        pooled = torch.nn.functional.avg_pool2d(flat, 2, ceil_mode=True)
        return pooled.reshape(*x.shape[:-2], *pooled.shape[-2:])
    if x.dim() == 3 and x.shape[-1] > 1:
        return torch.nn.functional.avg_pool1d(x, 2, ceil_mode=True)
    return None


def worst_sample_sqnr(reference: torch.Tensor, test: torch.Tensor) -> float:
    """The worst sample's SQNR (dB) between two batches of latents (samples first), averaged over
    scales: full resolution, then halved (2 x 2 means) until each channel is one value.

    Raises:
        ValueError: the shapes differ.
    """
    if reference.shape != test.shape:
        raise ValueError(f"latents of shapes {tuple(reference.shape)} and {tuple(test.shape)} cannot be compared")
    ref: torch.Tensor | None = reference.double()
    got: torch.Tensor | None = test.double()
    worst = []
    while ref is not None and got is not None:
        worst.append(float(_per_sample_sqnr(ref, got).min()))
        ref, got = _coarser(ref), _coarser(got)
    return sum(worst) / len(worst)


class LatentRun:
    """The pipeline on ``samples`` calibration samples from sample ``first`` on, final latents out;
    with ``fresh_noise``, from initial noise that calibration did not use."""

    def __init__(self, pipe: Any, stats: CalibrationStats, samples: int, fresh_noise: bool = False,
                 first: int = 0) -> None:  # fmt: skip
        self.pipe = pipe
        self.sampling = CalibrationCalls.of(pipe, stats, samples, output_type="latent", fresh_noise=fresh_noise,
                                            first=first)  # fmt: skip
        self.samples = self.sampling.samples
        self.denoiser = find_denoiser(pipe, stats.denoiser or None)
        pipe.set_progress_bar_config(disable=True)
        self.reference = self._run()

    def _run(self) -> torch.Tensor:
        return output_tensor(self.sampling.run(self.pipe))

    def sqnr_under(self, applied: Callable[[], Any]) -> float:
        """Latent SQNR (dB, pooled over the samples, capped at 200) of a run inside the context
        manager ``applied()`` returns, against the reference run."""
        return min(sqnr_db(self.reference.numpy(), self._run_under(applied).numpy()), _CAP_DB)

    def worst_sqnr_under(self, applied: Callable[[], Any]) -> float:
        """:func:`worst_sample_sqnr` (dB) of a run inside the context manager ``applied()``
        returns, against the reference run."""
        return worst_sample_sqnr(self.reference, self._run_under(applied))

    def _run_under(self, applied: Callable[[], Any]) -> torch.Tensor:
        with applied():
            return self._run()

    def score(self, schedule: CacheSchedule) -> tuple[float, float]:
        """(:func:`worst_sample_sqnr` of the final latents against the uncached run, in dB; the
        compute fraction counted)."""
        with cache_schedule_applied(self.denoiser, schedule, getattr(self.pipe, "scheduler", None)) as run:
            got = self._run()
        return worst_sample_sqnr(self.reference, got), float(run.compute_fraction or 0.0)


def longest_reuse(compute: tuple[bool, ...]) -> int:
    """The longest run of reusing steps."""
    longest = run = 0
    for c in compute:
        run = 0 if c else run + 1
        longest = max(longest, run)
    return longest


def _moves(compute: tuple[bool, ...], max_run: int | None = None, fixed: int = 1) -> list[tuple[bool, ...]]:
    """Schedules with one computing step (never one of the first ``fixed``) moved by one or two
    steps, either way, keeping runs of reusing steps at most ``max_run`` long."""
    out = []
    for t, c in enumerate(compute):
        if not c or t < fixed:
            continue
        for d in (-1, 1, -2, 2):
            u = t + d
            if fixed <= u < len(compute) and not compute[u]:
                moved = list(compute)
                moved[t], moved[u] = False, True
                if max_run is None or longest_reuse(tuple(moved)) <= max_run:
                    out.append(tuple(moved))
    return out


_Measure = Callable[[CacheSchedule], tuple[float, float]]


def refine(start: CacheSchedule, score: float, measure: _Measure, trials: int, max_run: int | None = None,
           fixed: int = 1) -> tuple[CacheSchedule, float, list[dict[str, Any]]]:  # fmt: skip
    """Hill-climb from ``start`` (measured ``score``) for at most ``trials`` measurements, keeping
    runs of reusing steps at most ``max_run`` long and the first ``fixed`` steps computing.

    Returns:
        (the best schedule, its score, one row per trial).
    """
    best, best_score = start, score
    rows: list[dict[str, Any]] = []
    improved = True
    while improved and len(rows) < trials:
        improved = False
        for compute in _moves(best.compute, max_run, fixed):
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
