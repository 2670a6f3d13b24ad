"""What a cache-schedule search needs, recorded while calibration runs the FP pipeline.

For the first calibration batch, at every denoiser call: the denoiser's output, and for every block
the streams going in and coming out (:mod:`diffkiln.calibrate.blocks`), each as a fixed, seeded
subsample of its elements. From these, for every candidate (reuse the whole output; skip a range of
a residual-capable block list and add its residual back; reuse the outputs of the deep blocks), the
*proxy* error of reusing step ``j``'s value at step ``t``: the relative L1 change of the reused
value, ``|v_t - v_j|_1 / |h_t|_1``, ``h_t`` being the hidden state the reuse feeds (MagCache and
DBCache record the same change at run time). Calls are grouped into steps and CFG branches by
order: ``calls_per_step`` calls make one step. The result is kept in the calibration cache file.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from diffkiln.calibrate.blocks import BlockLayout
from diffkiln.core.arguments import bind_call
from diffkiln.core.cache_schedule import CacheMechanism
from diffkiln.core.errors import InvalidInputError
from diffkiln.core.hooks import output_tensors, scoped_hooks

__all__ = ["CacheCandidate", "CacheRecorder", "CacheStats", "cache_recording"]

SUBSAMPLE = 8192
"""Elements kept of each recorded tensor (a fixed seeded subset, the same at every call)."""
_MAX_EDGE = 8
"""Residual ranges start at most this many blocks into their list and end at most this many before its end."""


@dataclass(frozen=True)
class CacheCandidate:
    """One way to reuse: a mechanism and the blocks it skips.

    Attributes:
        mechanism: :class:`~diffkiln.core.cache_schedule.CacheMechanism` value.
        start: first skipped block.
        end: one past the last skipped block.
        list_index: for ``residual``, the block list the range lies in; else -1.
    """

    mechanism: str
    start: int
    end: int
    list_index: int = -1

    @property
    def name(self) -> str:
        """A short label: ``whole``, ``residual[1:3]``, ``deep[1:6]``."""
        return "whole" if self.mechanism == "whole" else f"{self.mechanism}[{self.start}:{self.end}]"


@dataclass
class CacheStats:
    """The recorded proxies.

    Attributes:
        layout: the denoiser's blocks.
        steps: sampler steps (calls per branch).
        calls_per_step: denoiser calls per step (CFG branches called separately).
        candidates: the candidates, in the order of ``distances``.
        distances: (C, steps, steps): ``[c, j, t]`` the proxy error of reusing step j at step t
            (j < t), averaged over branches.
    """

    layout: BlockLayout
    steps: int
    calls_per_step: int
    candidates: tuple[CacheCandidate, ...]
    distances: torch.Tensor

    def to_meta(self) -> dict[str, Any]:
        """JSON-ready metadata (the distances go into the tensor file)."""
        return {
            "layout": self.layout.to_dict(),
            "steps": self.steps,
            "calls_per_step": self.calls_per_step,
            "candidates": [[c.mechanism, c.start, c.end, c.list_index] for c in self.candidates],
        }

    @classmethod
    def from_meta(cls, meta: dict[str, Any], distances: torch.Tensor) -> CacheStats:
        """Inverse of :meth:`to_meta`."""
        candidates = tuple(CacheCandidate(m, s, e, li) for m, s, e, li in meta["candidates"])
        return cls(BlockLayout.from_dict(meta["layout"]), meta["steps"], meta["calls_per_step"], candidates, distances)


def candidates_for(layout: BlockLayout) -> list[CacheCandidate]:
    """Every candidate the layout allows (see the module docstring)."""
    out = [CacheCandidate(CacheMechanism.WHOLE.value, 0, len(layout.blocks))]
    for li, blist in enumerate(layout.lists):
        if not blist.residual_capable:
            continue
        for s in range(blist.start, min(blist.residual_end, blist.start + _MAX_EDGE + 1)):
            for e in range(max(s + 1, blist.residual_end - _MAX_EDGE), blist.residual_end + 1):
                if (s, e) != (blist.start, blist.residual_end) or len(layout.blocks) > e - s:
                    out.append(CacheCandidate(CacheMechanism.RESIDUAL.value, s, e, li))
    n = len(layout.blocks)
    for k in range(1, (n - 1) // 2 + 1):
        out.append(CacheCandidate(CacheMechanism.DEEP.value, k, n - k))
    return out


class CacheRecorder:
    """Collects the subsampled tensors of every denoiser call (hooks: :func:`cache_recording`)."""

    def __init__(self, layout: BlockLayout, seed: int = 0) -> None:
        self.layout = layout
        self.calls: list[dict[str, torch.Tensor]] = []
        self.current: dict[str, torch.Tensor] | None = None
        # One subsample per element count, shared by every key of that count: a residual is ``out.e
        # - in.s`` element by element, so both streams need the same positions; and calls of another
        # size (LTX-2's batched guidance call beside its single ones) get positions of their own.
        self._index: dict[int, torch.Tensor] = {}
        self._gen = torch.Generator().manual_seed(seed)
        self.active = True
        self.stream_list = {i: bl for bl in layout.lists if bl.residual_capable for i in range(bl.start, bl.end)}

    def keep(self, key: str, tensors: list[torch.Tensor]) -> None:
        """Store a subsample of the concatenated tensors under ``key`` for the current call."""
        if self.current is None:
            return
        flat = torch.cat([t.detach().reshape(-1).float().cpu() for t in tensors])
        n = flat.numel()
        if n not in self._index:
            pick = torch.randperm(n, generator=self._gen)[:SUBSAMPLE].sort().values
            self._index[n] = pick if n > SUBSAMPLE else torch.arange(n)
        self.current[key] = flat[self._index[n]]

    def finish(self, steps: int) -> CacheStats:
        """The proxies over ``steps`` sampler steps.

        Raises:
            InvalidInputError: the calls do not divide into ``steps`` steps.
        """
        n_calls = len(self.calls)
        if n_calls == 0 or n_calls % steps:
            raise InvalidInputError(
                f"the denoiser ran {n_calls} calls in one pipeline call of {steps} steps; the cache search needs "
                "the same number of calls at every step"
            )
        cps = n_calls // steps
        candidates = candidates_for(self.layout)
        dist = torch.zeros(len(candidates), steps, steps)
        for ci, cand in enumerate(candidates):
            for branch in range(cps):
                values, norms = [], []
                for t in range(steps):
                    call = self.calls[t * cps + branch]
                    v, h = _reused(call, cand)
                    values.append(v)
                    norms.append(float(h.abs().sum()) or 1.0)
                v = torch.stack(values)  # (steps, S)
                pair = (v[None, :, :] - v[:, None, :]).abs().sum(-1)  # [j, t]
                dist[ci] += pair / torch.tensor(norms)[None, :] / cps
        return CacheStats(self.layout, steps, cps, tuple(candidates), dist)


def _reused(call: dict[str, torch.Tensor], cand: CacheCandidate) -> tuple[torch.Tensor, torch.Tensor]:
    """The value a candidate reuses at one call, and the hidden state it feeds."""
    if cand.mechanism == CacheMechanism.WHOLE.value:
        return call["out"], call["out"]
    if cand.mechanism == CacheMechanism.RESIDUAL.value:
        out = call[f"out.{cand.end - 1}"]
        return out - call[f"in.{cand.start}"], out
    out = call[f"out.{cand.end - 1}"]
    return out, out


@contextmanager
def cache_recording(denoiser: nn.Module, recorder: CacheRecorder) -> Iterator[CacheRecorder]:
    """Named forward hooks on the denoiser and its blocks feeding ``recorder`` while
    ``recorder.active``; removed on exit."""
    modules = dict(denoiser.named_modules())
    layout = recorder.layout

    def start(_m: nn.Module, _a: tuple[Any, ...], _k: dict[str, Any]) -> None:
        recorder.current = {} if recorder.active else None

    def end(_m: nn.Module, _a: tuple[Any, ...], _k: dict[str, Any], out: Any) -> None:
        if recorder.current is not None:
            recorder.keep("out", output_tensors(out))  # every prediction (LTX-2: video and audio)
            recorder.calls.append(recorder.current)
        recorder.current = None

    def block_hook(i: int) -> Any:
        def hook(m: nn.Module, a: tuple[Any, ...], k: dict[str, Any], out: Any) -> None:
            if recorder.current is None:
                return
            blist = recorder.stream_list.get(i)
            if blist is not None and i < blist.residual_end:
                bound = bind_call(m, a, k)
                recorder.keep(f"in.{i}", [bound[s.argument] for s in blist.streams])
                outs = [out] if blist.output_arity == 0 else [out[s.output_index] for s in blist.streams]
                recorder.keep(f"out.{i}", outs)
            else:
                first = out if isinstance(out, torch.Tensor) else out[0]
                if isinstance(first, torch.Tensor):
                    recorder.keep(f"out.{i}", [first])

        return hook

    with scoped_hooks() as hooks:
        hooks.add_forward_pre_hook("diffkiln.cache_stats.start", denoiser, start)
        hooks.add_forward_hook("diffkiln.cache_stats.end", denoiser, end)
        for i, name in enumerate(layout.blocks):
            hooks.add_forward_hook(f"diffkiln.cache_stats.block{i}", modules[name], block_hook(i))
        yield recorder
