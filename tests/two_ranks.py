"""Two-process runs for the distributed tests, forked from one preloaded server per test process.

A spawned child imports torch, diffusers and diffkiln afresh: seconds per child, two children per
test, on a machine whose cores the other test worker is using too. multiprocessing's forkserver
imports :data:`PRELOAD` once, when the first run of this test process starts it, and forks each
child from that loaded state. The children still begin clean: the server is a fresh process that
only imported modules, so no test's state (threads, process groups, patched objects) reaches them.
Nor does a test's change to the environment: children see the environment the server started
with, so a rank's settings go in its arguments.
"""

from __future__ import annotations

import multiprocessing
from collections.abc import Callable
from typing import Any

# What the ranks import: the library's stages and the test helpers their bundles come from.
PRELOAD = ["torch", "diffusers", "transformers", "diffkiln.api", "diffkiln.runtime", "tests.runtime_e2e_helpers"]


def start_two(fn: Callable[..., None], args: tuple[Any, ...]) -> None:
    """``fn(rank, *args)`` in two processes, joined; a rank's exception or exit code is raised here
    as :func:`torch.multiprocessing.start_processes` raises it. Forked from the preloaded server
    where the platform has one, else spawned."""
    import torch.multiprocessing as mp

    method = "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"
    if method == "forkserver":
        multiprocessing.set_forkserver_preload(PRELOAD)  # read once: when the server starts
    mp.start_processes(fn, args=args, nprocs=2, join=True, start_method=method)
