"""How many CPU threads diffkiln's work uses: a ``--threads`` option, and a default that leaves the
cores other jobs are using alone.

torch's own default takes every core the process may run on. On a machine loaded by other jobs
each stage then competes with them for every core, and time-slicing oversubscribed thread pools
costs far more than the cores it gains: an idle core count is the better default there.
"""

from __future__ import annotations

import os

from diffkiln.core.errors import InvalidInputError

__all__ = ["available_cpus", "default_threads", "set_threads"]

_THREAD_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")


def available_cpus() -> int:
    """The CPUs this process may run on (its affinity mask, not the machine's count)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not on Linux
        return max(1, os.cpu_count() or 1)


def default_threads() -> int:
    """``OMP_NUM_THREADS`` when the user set it; otherwise the available CPUs less the ones the
    1-minute load average says are busy (at least 1)."""
    for name in _THREAD_ENV:
        value = os.environ.get(name, "").strip()
        if value.isdigit() and int(value) > 0:
            return int(value)
    cpus = available_cpus()
    try:
        busy = int(os.getloadavg()[0] + 0.5)
    except OSError:  # no load average on this system
        busy = 0
    return max(1, min(cpus, cpus - busy))


def set_threads(threads: int | None) -> int:
    """Use ``threads`` CPU threads in torch and onnxruntime sessions opened afterwards (None: the
    :func:`default_threads`); returns the number set.

    Raises:
        InvalidInputError: ``threads`` is not a positive integer.
    """
    import torch

    if threads is not None and threads <= 0:
        raise InvalidInputError(f"--threads must be a positive integer, got {threads}")
    n = threads if threads is not None else default_threads()
    torch.set_num_threads(n)
    os.environ["DIFFKILN_THREADS"] = str(n)  # read by onnxruntime sessions and worker processes
    return n
