"""torch.distributed as the stages use it: this process's rank, the process group from torchrun's
environment, rank 0 first, gathering Python objects, and a map whose items are dealt over the
ranks (the searches' candidate validations). With no process group every helper is
the single-process case (rank 0 of 1), so the stages call them unconditionally.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import closing, contextmanager, nullcontext
from typing import Any, TypeVar

import torch

__all__ = ["all_gather_objects", "barrier", "init_distributed", "rank_world", "rank_zero_first", "sharded_map"]

T = TypeVar("T")
R = TypeVar("R")

_BACKENDS = {"cpu": "gloo", "cuda": "nccl", "npu": "hccl"}


def rank_world() -> tuple[int, int]:
    """``(rank, world size)`` of the default process group, or ``(0, 1)`` without one."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_distributed(device: torch.device) -> tuple[int, int]:
    """This process's ``(rank, world size)``: of the default process group, initialized here from
    torchrun's environment (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``...) when it is not yet, with
    the device's backend (gloo on CPU, nccl on CUDA, hccl on NPU: torch_npu imported only then).

    Raises:
        RuntimeError: no process group and no torchrun environment: launch with torchrun, or
            initialize ``torch.distributed`` first.
    """
    import torch.distributed as dist

    if not dist.is_initialized():
        if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
            raise RuntimeError(
                "this needs a torch.distributed process group: launch with `torchrun --nproc-per-node N ...`, "
                "or call torch.distributed.init_process_group first"
            )
        if device.type == "npu":
            import torch_npu  # noqa: F401  # registers the hccl backend
        dist.init_process_group(_BACKENDS.get(device.type, "gloo"))
    return dist.get_rank(), dist.get_world_size()


def barrier() -> None:
    """Wait for every rank (nothing without a process group)."""
    import torch.distributed as dist

    if rank_world()[1] > 1:
        dist.barrier()


@contextmanager
def rank_zero_first() -> Iterator[None]:
    """Run the block on rank 0, then on the other ranks: what rank 0 writes to a shared disk
    cache (calibration statistics), the others then read instead of writing it concurrently."""
    rank, world = rank_world()
    if world > 1 and rank != 0:
        barrier()
    try:
        yield
    finally:
        if world > 1 and rank == 0:
            barrier()


def all_gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj`` (picklable), in rank order; ``[obj]`` without a process group."""
    import torch.distributed as dist

    world = rank_world()[1]
    if world == 1:
        return [obj]
    out: list[Any] = [None] * world
    dist.all_gather_object(out, obj)
    return out


def sharded_map(fn: Callable[[T], R], items: Sequence[T], progress: Any = None) -> list[R]:
    """``[fn(x) for x in items]`` with the items dealt round-robin over the ranks; every rank gets
    the whole list, in order. Each item's result is computed by one rank with the same code as in
    one process, so the list is the single-process one wherever ``fn`` is deterministic.

    Args:
        fn: the work per item.
        items: the items.
        progress: wraps this rank's share for display (e.g. a ``tqdm`` partial), or None; closed
            when the work ends or fails.
    """
    rank, world = rank_world()
    share = range(rank, len(items), world)
    shown = progress(share) if progress is not None else share
    # Closed on a failure too: a bar left open runs into the error line the CLI prints.
    with closing(shown) if hasattr(shown, "close") else nullcontext():
        mine = {i: fn(items[i]) for i in shown}
    if world == 1:
        return [mine[i] for i in range(len(items))]
    merged: dict[int, R] = {}
    for part in all_gather_objects(mine):
        merged.update(part)
    return [merged[i] for i in range(len(items))]
