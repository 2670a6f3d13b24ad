"""Atomic output folders: the lock against concurrent writers and the clean-up of dead writers' leftovers."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from diffkiln.core.atomic import atomic_directory
from diffkiln.core.errors import BundleError


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_second_writer_of_the_same_output_fails_while_the_first_writes(tmp_path: Path) -> None:
    out = tmp_path / "bundle"
    with atomic_directory(out, overwrite=False) as tmp:
        (tmp / "a").write_text("first")
        with pytest.raises(BundleError, match="another diffkiln process is writing"), atomic_directory(out, True):
            pass
    assert (out / "a").read_text() == "first"
    # Once the first is done, a second without --overwrite is refused, and nothing of it is left.
    with pytest.raises(BundleError, match="already exists"), atomic_directory(out, overwrite=False):
        pass
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]


def test_leftovers_of_dead_writers_are_removed_and_live_ones_kept(tmp_path: Path) -> None:
    out = tmp_path / "bundle"
    dead = tmp_path / f".bundle.partial-{_dead_pid()}-x1"
    old = tmp_path / f".bundle.old-{_dead_pid()}"
    live = tmp_path / f".bundle.partial-{os.getppid()}-x2"
    other = tmp_path / f".other.partial-{_dead_pid()}-x3"
    for folder in (dead, old, live, other):
        folder.mkdir()
        (folder / "f").write_text("x")
    with atomic_directory(out, overwrite=False) as tmp:
        (tmp / "a").write_text("new")
    assert not dead.exists() and not old.exists()
    assert live.exists() and other.exists()  # a running writer's, and another output's


def test_a_failed_write_leaves_nothing(tmp_path: Path) -> None:
    out = tmp_path / "bundle"
    with pytest.raises(RuntimeError), atomic_directory(out, overwrite=False) as tmp:
        (tmp / "a").write_text("half")
        raise RuntimeError("killed")
    assert list(tmp_path.iterdir()) == []
