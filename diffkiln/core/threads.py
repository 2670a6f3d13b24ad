"""How many CPU threads diffkiln's work uses: a ``--threads`` option, and a default that leaves the
cores other jobs are using alone (measured when the command starts).

torch's own default takes every core the process may run on. On a machine loaded by other jobs
each stage then competes with them for every core, and time-slicing oversubscribed thread pools
costs far more than the cores it gains: an idle core count is the better default there.
"""

from __future__ import annotations

import os
import time

from diffkiln.core.errors import InvalidInputError

__all__ = ["available_cpus", "busy_cpus", "default_threads", "set_threads"]

_THREAD_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")


def available_cpus() -> int:
    """The CPUs this process may run on (its affinity mask, not the machine's count)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not on Linux
        return max(1, os.cpu_count() or 1)


def busy_cpus(window: float = 0.25) -> float:
    """How many CPUs other processes keep busy now: the machine's non-idle CPU time over
    ``window`` seconds while this process sleeps (Linux ``/proc/stat``). Elsewhere, the 1-minute
    load average. A load average would also count the diffkiln command that ran just before
    (``make demo`` runs five in a row), so it is only the fallback."""

    def sample() -> tuple[int, int]:
        with open("/proc/stat", encoding="ascii") as f:
            values = [int(v) for v in f.readline().split()[1:]]
        idle = values[3] + (values[4] if len(values) > 4 else 0)  # idle + iowait
        return sum(values[:8]), idle

    try:
        total0, idle0 = sample()
        time.sleep(window)
        total1, idle1 = sample()
    except (OSError, ValueError, IndexError):
        try:
            return os.getloadavg()[0]
        except OSError:  # no load average on this system
            return 0.0
    machine = os.cpu_count() or 1
    return machine * (1.0 - (idle1 - idle0) / max(total1 - total0, 1))


def default_threads() -> int:
    """``OMP_NUM_THREADS`` when the user set it; otherwise the available CPUs less the ones
    other processes keep busy now (:func:`busy_cpus`, rounded), at least 1."""
    for name in _THREAD_ENV:
        value = os.environ.get(name, "").strip()
        if value.isdigit() and int(value) > 0:
            return int(value)
    cpus = available_cpus()
    return max(1, min(cpus, cpus - int(busy_cpus() + 0.5)))


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
