"""Write an output folder atomically: into a temporary sibling, renamed into place when complete.

While it writes, the writer holds an exclusive lock on ``.NAME.lock`` beside the folder, so a
second build to the same output fails at once instead of replacing the first one's result; and it
removes the ``.NAME.partial-PID-*`` and ``.NAME.old-PID`` folders that writers killed midway
(their process gone) left behind.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from diffkiln.core.errors import BundleError
from diffkiln.core.schema import file_digest

__all__ = ["atomic_directory", "file_table"]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def _remove_stale(out: Path) -> None:
    """Delete leftovers of writers of ``out`` whose process is gone."""
    pattern = re.compile(rf"\.{re.escape(out.name)}\.(?:partial|old)-(\d+)(?:-.*)?")
    for entry in out.parent.iterdir():
        match = pattern.fullmatch(entry.name)
        if match and entry.is_dir() and not entry.is_symlink() and not _alive(int(match.group(1))):
            shutil.rmtree(entry, ignore_errors=True)


@contextmanager
def _locked(out: Path) -> Iterator[None]:
    lock = out.with_name(f".{out.name}.lock")
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise BundleError(f"another diffkiln process is writing {out}; wait for it to finish or choose another "
                              "output") from None  # fmt: skip
        try:
            yield
        finally:
            # Removed while still held: a writer that opened the old file before now fails its
            # own existence check under the lock, so at worst it reports the folder as existing.
            with contextlib.suppress(OSError):
                lock.unlink()
    finally:
        os.close(fd)


@contextmanager
def atomic_directory(out: Path, overwrite: bool) -> Iterator[Path]:
    """Yield a temporary folder beside ``out``; on success it replaces ``out``, on any error it is
    removed, so ``out`` is never half-written. Holds ``out``'s lock throughout (module docstring).

    Args:
        out: the final folder.
        overwrite: replace an existing ``out`` (only once the new one is complete).

    Raises:
        BundleError: ``out`` exists and ``overwrite`` is False, or another process is writing it.
    """
    if out.exists() and not overwrite:
        raise BundleError(f"{out} already exists; pass --overwrite to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    with _locked(out):
        if out.exists() and not overwrite:  # written by another process while this one worked
            raise BundleError(f"{out} already exists; pass --overwrite to replace it")
        _remove_stale(out)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-{os.getpid()}-", dir=out.parent))
        try:
            yield tmp
            if out.exists():
                old = out.with_name(f".{out.name}.old-{os.getpid()}")
                out.rename(old)
                tmp.rename(out)
                shutil.rmtree(old)
            else:
                tmp.rename(out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise


def file_table(root: Path) -> dict[str, dict[str, object]]:
    """``{relative path: {"sha256", "bytes"}}`` for every file under ``root``, sorted."""
    return {
        path.relative_to(root).as_posix(): {"sha256": file_digest(path), "bytes": path.stat().st_size}
        for path in sorted(p for p in root.rglob("*") if p.is_file())
    }
