"""The CLI's thread count: the user's, else the CPUs other processes leave idle."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from diffkiln.core.errors import InvalidInputError
from diffkiln.core.threads import available_cpus, busy_cpus, default_threads, set_threads


def test_a_spinning_process_counts_as_a_busy_cpu() -> None:
    idle = busy_cpus()
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        busy = busy_cpus(0.5)
    finally:
        spinner.kill()
        spinner.wait()
    # The spinner holds one CPU; the other test worker may add to it, never take from it.
    assert busy >= 0.7 and busy >= idle - 1.0


def test_the_users_setting_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    before = torch.get_num_threads()
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert default_threads() == 3
    monkeypatch.delenv("OMP_NUM_THREADS")
    monkeypatch.delenv("MKL_NUM_THREADS", raising=False)
    assert 1 <= default_threads() <= available_cpus()
    try:
        assert set_threads(1) == 1 and torch.get_num_threads() == 1
        with pytest.raises(InvalidInputError, match="positive integer"):
            set_threads(0)
    finally:
        torch.set_num_threads(before)
        os.environ.pop("DIFFKILN_THREADS", None)  # set for onnxruntime sessions; not for later tests
