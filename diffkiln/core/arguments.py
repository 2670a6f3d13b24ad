"""How a call's keyword arguments map to flat, named tensors: the ONNX export names its graph
inputs this way and the onnxruntime backend feeds them back (a contract of the ONNX export)."""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["ARG_SEPARATOR", "flatten_arguments", "unflatten_arguments"]

ARG_SEPARATOR = "__"
"""Joins a dict argument's name and key into one input name (``added_cond_kwargs__text_embeds``)."""


def flatten_arguments(kwargs: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split call arguments into tensors (a dict of tensors becomes ``name__key`` entries) and the
    rest; the exporter names ONNX inputs the same way."""
    tensors: dict[str, torch.Tensor] = {}
    rest: dict[str, Any] = {}
    for key, value in kwargs.items():
        if isinstance(value, torch.Tensor):
            tensors[key] = value
        elif isinstance(value, dict) and value and all(isinstance(v, torch.Tensor) for v in value.values()):
            tensors.update({f"{key}{ARG_SEPARATOR}{k}": v for k, v in value.items()})
        else:
            rest[key] = value
    return tensors, rest


def unflatten_arguments(flat: dict[str, Any]) -> dict[str, Any]:
    """Inverse of :func:`flatten_arguments` for tensors: ``a__b`` keys become ``{"a": {"b": ...}}``."""
    out: dict[str, Any] = {}
    for key, value in flat.items():
        outer, sep, inner = key.partition(ARG_SEPARATOR)
        if sep:
            out.setdefault(outer, {})[inner] = value
        else:
            out[key] = value
    return out
