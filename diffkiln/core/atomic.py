"""Write an output folder atomically: into a temporary sibling, renamed into place when complete.

While it writes, the writer holds an exclusive lock on ``.NAME.lock`` beside the folder, so a
second build to the same output fails at once instead of replacing the first one's result; and it
removes the ``.NAME.partial-PID-*`` and ``.NAME.old-PID`` folders that writers killed midway
(their process gone) left behind.

``overwrite`` replaces only a folder that diffkiln wrote (one holding a diffkiln manifest, see
:func:`diffkiln_output_kind`) or an empty one: any other folder may hold a user's own files, and is
refused with the reason. The finished folder gets the usual modes (folders ``0o777 & ~umask``,
files ``0o666 & ~umask``) where a writer left the private ones of ``mkdtemp``/``mkstemp``, so that
another user or service can load it.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from diffkiln.core.errors import BundleError, InvalidInputError, OutputPathError
from diffkiln.core.schema import MANIFEST_NAME, file_digest

__all__ = ["atomic_directory", "check_output_folder", "check_results_folder", "diffkiln_output_kind", "file_table"]

# The manifests by which diffkiln's writers mark their output folders (bundle and ONNX export:
# ``manifest.json``; MindIE-SD export: ``diffkiln_export.json``).
_MARKERS = (MANIFEST_NAME, "diffkiln_export.json")
_MARKER_BYTES = 64 * 1024 * 1024


def diffkiln_output_kind(folder: Path) -> str | None:
    """The ``format`` of the diffkiln manifest in ``folder`` (``diffkiln.bundle``,
    ``diffkiln.onnx``, ``diffkiln.mindiesd``), or None when ``folder`` holds none."""
    for name in _MARKERS:
        path = folder / name
        if not path.is_file() or path.is_symlink() or path.stat().st_size > _MARKER_BYTES:
            continue
        try:
            manifest = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError):
            continue
        kind = manifest.get("format") if isinstance(manifest, dict) else None
        if isinstance(kind, str) and kind.startswith("diffkiln."):
            return kind
    return None


def check_output_folder(out: Path, overwrite: bool) -> None:
    """Raise :class:`OutputPathError` (a :class:`BundleError`) unless ``out`` may be written:
    absent, an empty folder, or (with ``overwrite``) a folder that diffkiln wrote. Writers call it
    before long work, so a refusal comes before the minutes spent, not after."""
    if not out.exists() and not out.is_symlink():
        return
    if out.is_symlink() or not out.is_dir():
        raise OutputPathError(f"{out} exists and is not a folder; choose another output path")
    if not any(out.iterdir()):
        return
    if not overwrite:
        raise OutputPathError(f"{out} already exists; pass --overwrite to replace it")
    if diffkiln_output_kind(out) is None:
        raise OutputPathError(
            f"{out} is not empty and holds no diffkiln manifest, so it may hold your own files: "
            "--overwrite replaces only a folder diffkiln wrote; choose another output path or empty it yourself"
        )


def check_results_folder(out: Path, option: str = "--out") -> None:
    """Raise :class:`InvalidInputError` unless a folder of results (images, a report) can be
    written at ``out``: absent or a folder, under a writable parent. Called before the work.

    Args:
        out: the folder.
        option: the option the user gave it with, named in the message.
    """
    if out.exists() and not out.is_dir():
        raise InvalidInputError(f"{option} {out} is an existing file; give a folder (it is created when missing)")
    parent = out
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise InvalidInputError(f"{option} {out}: {parent} is a file, not a folder; give another path")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise InvalidInputError(f"{option} {out}: {parent} is not writable by this user; give another path")


def _usual_modes(root: Path) -> None:
    """Give folders and files left private by mkdtemp/mkstemp (0o700/0o600) the umask's modes;
    other modes are a writer's choice (MindIE-SD's 0o750/0o640) and stay."""
    umask = os.umask(0)
    os.umask(umask)
    for path in [root, *root.rglob("*")]:
        if path.is_symlink():
            continue
        mode = path.stat().st_mode & 0o777
        if path.is_dir() and mode == 0o700:
            path.chmod(0o777 & ~umask)
        elif path.is_file() and mode == 0o600:
            path.chmod(0o666 & ~umask)


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
        overwrite: replace an existing ``out`` that diffkiln wrote (only once the new one is
            complete). An empty ``out`` is written without it.

    Raises:
        BundleError: ``out`` exists and ``overwrite`` is False; ``out`` is a file, or a non-empty
            folder without a diffkiln manifest; or another process is writing it.
    """
    check_output_folder(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    with _locked(out):
        check_output_folder(out, overwrite)  # written by another process while this one worked
        _remove_stale(out)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-{os.getpid()}-", dir=out.parent))
        try:
            yield tmp
            _usual_modes(tmp)
            check_output_folder(out, overwrite)  # a user's files may have appeared while this one worked
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
