"""Frozen config dataclasses to and from plain data: JSON in plans and manifests, options from the CLI.

Enum fields are written as their values and read back through the field's type; tuples as lists.
"""

from __future__ import annotations

import dataclasses
import enum
import re
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from diffkiln.core.errors import InvalidInputError

__all__ = ["config_from_dict", "config_from_options", "config_to_dict"]


def config_to_dict(config: Any) -> dict[str, Any]:
    """A JSON-ready dict of a config dataclass (enums as values, tuples as lists, paths as text)."""

    def plain(v: Any) -> Any:
        if isinstance(v, enum.Enum):
            return v.value
        if isinstance(v, (tuple, list)):
            return [plain(x) for x in v]
        if isinstance(v, Path):
            return str(v)
        if dataclasses.is_dataclass(v) and not isinstance(v, type):
            return config_to_dict(v)
        return v

    return {f.name: plain(getattr(config, f.name)) for f in dataclasses.fields(config)}


def _convert(value: Any, hint: Any) -> Any:
    """``value`` (plain data) as the annotated type ``hint``: enums by value, tuples from lists."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None:
            return None
        for arg in typing.get_args(hint):
            if arg is type(None):
                continue
            try:
                return _convert(value, arg)
            except (TypeError, ValueError):
                continue
        return value
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        return value if isinstance(value, hint) else hint(value)
    if isinstance(hint, type) and issubclass(hint, Path) and value is not None:
        return Path(value)
    if origin is tuple and isinstance(value, (list, tuple)):
        return tuple(value)
    return value


def config_from_dict(cls: type[Any], d: Mapping[str, Any]) -> Any:
    """Rebuild a config dataclass from :func:`config_to_dict` output.

    Raises:
        ValueError: an unknown field, or a value the field rejects.
    """
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise ValueError(f"unknown {cls.__name__} field(s) {unknown}; valid: {sorted(known)}")
    return cls(**{k: _convert(v, hints[k]) for k, v in d.items()})


def config_from_options(
    cls: type[Any], options: Mapping[str, Any], what: str, flags: Mapping[str, str] | None = None
) -> Any:
    """A config dataclass from user options (e.g. the CLI's), each option named as a field.

    Options left as None are not given. An option that is not a field of ``cls`` is an error that
    names it, so an option never silently means nothing.

    Args:
        cls: the config dataclass.
        options: option name -> value (None: not given).
        what: what the config is for, for messages (e.g. "recipe mixed").
        flags: field -> the option the user types for it (e.g. ``group_size`` ->
            ``--weight-group-size``), for messages; a field without one reads ``--field-name``.

    Raises:
        InvalidInputError: an option the config does not take, or a value it rejects.
    """
    given = {k: v for k, v in options.items() if v is not None}
    fields = {f.name for f in dataclasses.fields(cls)}
    extra = sorted(set(given) - fields)
    if extra:

        def flag(name: str) -> str:
            return (flags or {}).get(name) or "--" + name.replace("_", "-")

        names = ", ".join(flag(k) for k in extra)
        valid = ", ".join(sorted(flag(k) for k in fields if flags is None or k in flags))
        raise InvalidInputError(f"{names} does not apply to {what}; its options: {valid}")
    hints = typing.get_type_hints(cls)
    try:
        return cls(**{k: _convert(v, hints[k]) for k, v in given.items()})
    except (TypeError, ValueError) as exc:
        message = str(exc)
        for name, typed in (flags or {}).items():  # say "--avg-weight-bits", as the user typed it
            if "_" in name:
                message = re.sub(rf"\b{re.escape(name)}\b", typed, message)
        if isinstance(exc, InvalidInputError):
            raise type(exc)(message) from None
        raise InvalidInputError(f"{what}: {message}") from None
