"""A bundle's cache schedule as MindIE-SD's ``CacheConfig``, where it has that form.

From MindIE-SD's source (``mindiesd/cache_agent/cache.py``, ``cache_agent.py``,
``dit_block_cache.py``): ``CacheAgent(CacheConfig(method="dit_block_cache", blocks_count,
steps_count, step_start, step_interval, step_end, block_start, block_end))`` wraps each block call
of one block loop. A step computes every block when it is before ``step_start`` or when
``(step - step_start) % step_interval == 0``; on the other steps, block ``block_start`` returns its
input plus the residual blocks ``[block_start, block_end)`` added at the last computing step, and
the blocks up to ``block_end`` pass their input on. ``step_end`` is only checked against
``step_start``; an interval of 1 disables the cache. Its step counter counts ``blocks_count`` calls
per step, so each step must run the loop once (CFG in one batch).

So a diffkiln schedule fits when it is ``residual`` over blocks of one block list and its computing
steps are exactly ``t < step_start`` or ``(t - step_start) % step_interval == 0``; the export writes
``mindiesd_cache_config.json`` then, and otherwise says why not.
"""

from __future__ import annotations

from typing import Any

from diffkiln.core.cache_schedule import CacheMechanism, CacheSchedule

__all__ = ["mindiesd_cache_config"]


def _periodic_form(compute: tuple[bool, ...]) -> tuple[int, int] | None:
    """(step_start, step_interval) with ``compute[t] == (t < start or (t - start) % interval == 0)``."""
    n = len(compute)
    for start in range(n + 1):
        for interval in range(2, n + 1):
            if all(compute[t] == (t < start or (t - start) % interval == 0) for t in range(n)):
                return start, interval
    return None


def _list_span(schedule: CacheSchedule) -> tuple[int, int] | None:
    """The blocks of the one module list the reused range lies in: consecutive names ``P.0 .. P.k``."""

    def split(name: str) -> tuple[str, int] | None:
        prefix, _, index = name.rpartition(".")
        return (prefix, int(index)) if index.isdigit() else None

    first = split(schedule.blocks[schedule.start])
    if first is None:
        return None
    members = [i for i, b in enumerate(schedule.blocks) if (p := split(b)) is not None and p[0] == first[0]]
    return (members[0], members[-1] + 1) if members else None


def mindiesd_cache_config(schedule: CacheSchedule) -> tuple[dict[str, Any] | None, str]:
    """MindIE-SD's ``CacheConfig`` fields for ``schedule``, or None, with the reason."""
    if schedule.mechanism is not CacheMechanism.RESIDUAL:
        return (
            None,
            f"MindIE-SD's dit_block_cache adds back a block range's residual; a '{schedule.mechanism.value}' "
            "schedule has no such form",
        )
    if schedule.extrapolate:
        return None, "MindIE-SD's dit_block_cache reuses the last residual; it does not extrapolate"
    if schedule.calls_per_step != 1:
        return (
            None,
            "MindIE-SD's step counter counts one block loop per step; this pipeline calls the denoiser "
            f"{schedule.calls_per_step} times per step",
        )
    form = _periodic_form(schedule.compute)
    if form is None:
        return (
            None,
            "its computing steps are not 'every step before step_start, then every step_interval-th' "
            "(search with --cache-periodic for a schedule of that form)",
        )
    span = _list_span(schedule)
    if span is None:
        return None, "the reused blocks are not elements of one block list"
    start, interval = form
    config = {
        "method": "dit_block_cache",
        "blocks_count": span[1] - span[0],
        "steps_count": schedule.steps,
        "step_start": start,
        "step_interval": interval,
        "step_end": schedule.steps,
        "block_start": schedule.start - span[0],
        "block_end": schedule.end - span[0],
    }
    return config, f"wrap each call of the blocks {schedule.blocks[span[0]]} .. {schedule.blocks[span[1] - 1]}"
