"""Argument value types of the ``diffkiln`` command line (bounded numbers, number lists, call
arguments); no torch is imported, so ``--help`` stays fast."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = [
    "bounded",
    "call_arg",
    "device_name",
    "float_list",
    "int_list",
    "non_negative_float",
    "non_negative_int",
    "parse_call_args",
    "positive_int",
]


def bounded(cast: Callable[[str], Any], lower: float, strict: bool, what: str) -> Callable[[str], Any]:
    """An argparse type: ``cast`` the text and require it above (``strict``) or at least ``lower``."""

    def parse(text: str) -> Any:
        try:
            value = cast(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}") from None
        if value < lower or (strict and value == lower):
            raise argparse.ArgumentTypeError(f"must be {what}, got {value}")
        return value

    return parse


def device_name(text: str) -> str:
    """An argparse type: ``auto``, ``cpu``, ``cuda``, ``npu``, or one with an index (``cuda:1``). Whether the
    machine has that device is checked once torch is imported (:func:`diffkiln.core.devices.resolve_device`)."""
    kind, colon, index = text.partition(":")
    if kind not in ("auto", "cpu", "cuda", "npu") or (colon and (kind == "auto" or not index.isdigit())):
        raise argparse.ArgumentTypeError(f"unknown device {text!r}; valid: auto, cpu, cuda, npu (cuda:1: a second GPU)")
    return text


positive_int = bounded(int, 0, True, "a positive integer")
non_negative_int = bounded(int, 0, False, "a non-negative integer")
non_negative_float = bounded(float, 0.0, False, "a number >= 0")


def _number_list(cast: Callable[[str], Any], example: str) -> Callable[[str], tuple[Any, ...]]:
    def parse(text: str) -> tuple[Any, ...]:
        try:
            values = tuple(cast(v) for v in text.split(",") if v.strip())
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be comma-separated numbers, e.g. {example}; got {text!r}") from None
        if not values:
            raise argparse.ArgumentTypeError("needs at least one value")
        return values

    return parse


int_list = _number_list(int, "2,4,8,16")
float_list = _number_list(float, "3,4,5,6,8")


def call_arg(text: str) -> tuple[str, Any]:
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"must be KEY=VALUE (e.g. num_frames=9), got {text!r}")
    try:
        value = json.loads(raw)
    except ValueError:
        value = raw  # a plain string (e.g. a scheduler mode)
    return key.strip(), value


def parse_call_args(pairs: list[tuple[str, Any]], path: Path | None) -> tuple[tuple[str, Any], ...]:
    """The pipeline-call arguments of ``--call-args FILE.json`` then ``--call-arg KEY=VALUE`` (which win).

    Raises:
        ValueError: the file is missing, not JSON, or not a JSON object.
    """
    merged: dict[str, Any] = {}
    if path is not None:
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ValueError(f"--call-args: {path} does not exist") from None
        except ValueError as exc:
            raise ValueError(f"--call-args: {path} is not JSON ({exc})") from None
        if not isinstance(data, dict):
            raise ValueError(f"--call-args: {path} must hold a JSON object of argument names and values")
        merged.update(data)
    merged.update(dict(pairs))
    return tuple(merged.items())
