"""Write an output folder atomically: into a temporary sibling, renamed into place when complete."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from diffkiln.core.errors import BundleError
from diffkiln.core.schema import file_digest

__all__ = ["atomic_directory", "file_table"]


@contextmanager
def atomic_directory(out: Path, overwrite: bool) -> Iterator[Path]:
    """Yield a temporary folder beside ``out``; on success it replaces ``out``, on any error it is
    removed, so ``out`` is never half-written.

    Args:
        out: the final folder.
        overwrite: replace an existing ``out`` (only once the new one is complete).

    Raises:
        BundleError: ``out`` exists and ``overwrite`` is False.
    """
    if out.exists() and not overwrite:
        raise BundleError(f"{out} already exists; pass --overwrite to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
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
