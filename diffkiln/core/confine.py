"""Keep a bundle's reader inside the bundle: paths, file kinds and JSON shape.

A bundle is untrusted input. Every path the runtime takes from it goes through
:func:`confined_file`: a relative POSIX path without ``..``, which resolves inside the bundle to a
regular file reached through no symlink (so no device, FIFO or link out of the folder is ever
opened). :func:`check_tree` refuses a bundle that holds anything but folders and listed regular
files, so no file the manifest does not list (and checksum) is ever read, by diffkiln or by the
diffusers and transformers loaders it calls. :func:`loads_strict` parses JSON refusing duplicate
keys (the last one would silently win), nesting deeper than :data:`MAX_JSON_DEPTH` and texts over
:data:`MAX_JSON_BYTES`.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path, PurePosixPath
from typing import Any

from diffkiln.core.errors import BundleError

__all__ = ["MAX_JSON_BYTES", "MAX_JSON_DEPTH", "check_tree", "confined_file", "loads_strict", "read_json_file"]

MAX_JSON_BYTES = 64 << 20
"""The largest JSON file a bundle may hold (a manifest of a full-size model is a few MB)."""
MAX_JSON_DEPTH = 64
"""The deepest nesting of JSON objects and arrays a bundle may hold."""


def _relative(rel: Any, what: str) -> PurePosixPath:
    if not isinstance(rel, str) or not rel or "\\" in rel or "\x00" in rel:
        raise BundleError(f"{what}: {rel!r} is not a relative path inside the bundle")
    path = PurePosixPath(rel)
    if path.is_absolute() or any(part in ("..", ".", "") for part in rel.split("/")):
        raise BundleError(f"{what}: {rel!r} leaves the bundle or is not a plain relative path (no '..', no absolute "
                          "paths)")  # fmt: skip
    return path


def confined_file(root: Path, rel: Any, what: str = "bundle file") -> Path:
    """``root / rel`` once checked: a plain relative path, every step inside ``root`` a real
    folder (no symlink), the last a regular file.

    Raises:
        BundleError: naming ``what``, the path and the rule it breaks.
    """
    parts = _relative(rel, what).parts
    current = root
    for i, part in enumerate(parts):
        current = current / part
        try:
            st = os.lstat(current)
        except FileNotFoundError:
            raise BundleError(f"{what} {rel} is missing") from None
        except OSError as exc:
            raise BundleError(f"{what} {rel} cannot be read: {exc.strerror}") from None
        last = i == len(parts) - 1
        if stat.S_ISLNK(st.st_mode):
            raise BundleError(f"{what} {rel} goes through a symbolic link; bundles hold only regular files")
        if last and not stat.S_ISREG(st.st_mode):
            raise BundleError(f"{what} {rel} is not a regular file (a folder, device or FIFO)")
        if not last and not stat.S_ISDIR(st.st_mode):
            raise BundleError(f"{what} {rel}: {'/'.join(parts[: i + 1])} is not a folder")
    return current


def check_tree(root: Path, listed: set[str], allowed: frozenset[str] = frozenset()) -> None:
    """Everything under ``root`` is a folder or a regular file named in ``listed`` (or ``allowed``,
    e.g. the manifest itself); nothing is followed through a link.

    Raises:
        BundleError: a link, device, FIFO or socket, or a file the manifest does not list.
    """
    stack = [(root, "")]
    while stack:
        folder, prefix = stack.pop()
        with os.scandir(folder) as entries:
            for entry in entries:
                rel = f"{prefix}{entry.name}"
                if entry.is_symlink():
                    raise BundleError(f"bundle entry {rel} is a symbolic link; bundles hold only regular files")
                if entry.is_dir(follow_symlinks=False):
                    stack.append((Path(entry.path), f"{rel}/"))
                elif not entry.is_file(follow_symlinks=False):
                    raise BundleError(f"bundle entry {rel} is not a regular file (a device, FIFO or socket)")
                elif rel not in listed and rel not in allowed:
                    raise BundleError(
                        f"bundle file {rel} is not listed in the manifest's files table, so it has no checksum; "
                        "diffkiln reads only listed files (remove it or re-export)"
                    )


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise BundleError(f"duplicate JSON key {key!r} (which one counts would be ambiguous)")
        out[key] = value
    return out


def _depth(value: Any) -> int:
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (dict, list)):
            deepest = max(deepest, depth)
            if depth > MAX_JSON_DEPTH:
                return depth
            stack.extend((v, depth + 1) for v in (item.values() if isinstance(item, dict) else item))
    return deepest


def loads_strict(text: str, source: str) -> Any:
    """Parse JSON text: no duplicate keys, nesting at most :data:`MAX_JSON_DEPTH`.

    Raises:
        BundleError: naming ``source`` and the rule.
    """
    if len(text) > MAX_JSON_BYTES:
        raise BundleError(f"{source} is {len(text)} characters; a bundle's JSON files are capped at {MAX_JSON_BYTES}")
    try:
        value = json.loads(text, object_pairs_hook=_no_duplicates)
    except BundleError as exc:
        raise BundleError(f"{source}: {exc}") from None
    except RecursionError:
        raise BundleError(f"{source} nests deeper than {MAX_JSON_DEPTH} levels") from None
    except (json.JSONDecodeError, ValueError) as exc:
        raise BundleError(f"{source} is not valid JSON (corrupt or truncated): {exc}") from None
    if _depth(value) > MAX_JSON_DEPTH:
        raise BundleError(f"{source} nests deeper than {MAX_JSON_DEPTH} levels")
    return value


def read_json_file(path: Path, source: str | None = None) -> Any:
    """:func:`loads_strict` of a regular file (checked before it is opened, size capped).

    Raises:
        BundleError: not a regular file, too large, not UTF-8, or not strict JSON.
    """
    name = source or str(path)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        raise BundleError(f"{name} is missing") from None
    if not stat.S_ISREG(st.st_mode):
        raise BundleError(f"{name} is not a regular file (a link, folder, device or FIFO)")
    if st.st_size > MAX_JSON_BYTES:
        raise BundleError(f"{name} is {st.st_size} bytes; a bundle's JSON files are capped at {MAX_JSON_BYTES}")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BundleError(f"{name} is not UTF-8 text: {exc}") from None
    return loads_strict(text, name)
