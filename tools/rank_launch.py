"""Run a tool's worker as one process or as ``torchrun --standalone --nproc-per-node N``, each
process on one thread (``OMP_NUM_THREADS=1``): what the side-by-side distributed benchmarks
compare. Imported by the ``bench_distributed_*`` and ``bench_cfg_parallel`` tools."""

from __future__ import annotations

import os
import subprocess
import sys


def run_ranks(args: list[str], nproc: int) -> None:
    """Run ``python ARGS`` as one process (``nproc`` 1) or under torchrun with ``nproc`` ranks;
    raise CalledProcessError when it fails."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    prefix = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
    subprocess.run([*(prefix if nproc > 1 else [sys.executable]), *args], env=env, check=True)
