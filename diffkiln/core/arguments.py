"""How a call's keyword arguments map to flat, named tensors: the ONNX export names its graph
inputs this way and the onnxruntime backend feeds them back (a contract of the ONNX export)."""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import nn

__all__ = [
    "ARG_SEPARATOR",
    "bind_call",
    "feed_array",
    "flatten_arguments",
    "is_generator",
    "is_int_argument",
    "json_form",
    "unflatten_arguments",
]

ARG_SEPARATOR = "__"
"""Joins a dict argument's name and key (``added_cond_kwargs__text_embeds``), or a tuple argument's
name and index (``image_rotary_emb__0``), into one input name; nested containers, each level."""


def _tensor_tree(value: Any) -> bool:
    """A tensor, or a non-empty dict (string keys), tuple or list whose leaves are all tensors."""
    if isinstance(value, torch.Tensor):
        return True
    if isinstance(value, dict):
        return bool(value) and all(isinstance(k, str) and _tensor_tree(v) for k, v in value.items())
    if isinstance(value, (tuple, list)):
        return bool(value) and all(_tensor_tree(v) for v in value)
    return False


def _flatten_into(out: dict[str, torch.Tensor], name: str, value: Any) -> None:
    if isinstance(value, torch.Tensor):
        out[name] = value
        return
    items = value.items() if isinstance(value, dict) else enumerate(value)
    for key, item in items:
        _flatten_into(out, f"{name}{ARG_SEPARATOR}{key}", item)


def flatten_arguments(kwargs: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split call arguments into tensors and the rest; the exporter names ONNX inputs the same way.

    A dict of tensors becomes ``name__key`` entries and a tuple or list of tensors (HunyuanDiT's
    rotary tables) ``name__0``, ``name__1``, ...; nested ones each level in turn (Allegro's
    ``((freqs_t, freqs_h, freqs_w), (grid_t, grid_h, grid_w))``, each ``freqs`` a pair:
    ``image_rotary_emb__0__1__0``). A container with anything but tensors at its leaves, and an
    empty one, goes with the rest.
    """
    tensors: dict[str, torch.Tensor] = {}
    rest: dict[str, Any] = {}
    for key, value in kwargs.items():
        if _tensor_tree(value):
            _flatten_into(tensors, key, value)
        else:
            rest[key] = value
    return tensors, rest


def unflatten_arguments(flat: dict[str, Any]) -> dict[str, Any]:
    """Inverse of :func:`flatten_arguments` for tensors: ``a__b`` keys become ``{"a": {"b": ...}}``,
    and ``a__0 .. a__n`` keys (every index from 0) the tuple ``a``, at every level."""
    out: dict[str, Any] = {}
    nested: dict[str, dict[str, Any]] = {}
    for key, value in flat.items():
        outer, sep, inner = key.partition(ARG_SEPARATOR)
        if sep:
            if outer not in nested:
                out[outer] = None  # its place among the arguments
                nested[outer] = {}
            nested[outer][inner] = value
        else:
            out[key] = value
    for key, entries in nested.items():
        tree = unflatten_arguments(entries)
        indices = [str(i) for i in range(len(tree))]
        out[key] = tuple(tree[i] for i in indices) if set(tree) == set(indices) else tree
    return out


_NUMPY_DTYPES = {
    "float": np.float32,
    "float16": np.float16,
    "double": np.float64,
    "int64": np.int64,
    "int32": np.int32,
    "bool": np.bool_,
}


def feed_array(value: torch.Tensor, dtype: str) -> np.ndarray:
    """``value`` as the array an ONNX input of element type ``dtype`` takes (``"int64"`` as the
    export's manifest writes it, or ``"tensor(int64)"`` as onnxruntime reports it); unknown
    types get float32."""
    name = dtype[len("tensor(") : -1] if dtype.startswith("tensor(") else dtype
    return value.detach().cpu().numpy().astype(_NUMPY_DTYPES.get(name, np.float32), copy=False)


def is_generator(value: Any) -> bool:
    """A random generator, or a non-empty list of them (a pipeline's per-sample ``generator``):
    an argument no graph takes (a VAE's ``decode`` draws no noise from it)."""
    if isinstance(value, (list, tuple)):
        return bool(value) and all(isinstance(v, torch.Generator) for v in value)
    return isinstance(value, torch.Generator)


def is_int_argument(value: Any) -> bool:
    """An int call argument (not a bool): what an ONNX graph may take as an int64 scalar input."""
    return isinstance(value, int) and not isinstance(value, bool)


def json_form(value: Any) -> Any:
    """A call argument as a JSON manifest holds it: tuples as lists, at any depth. An option
    recorded from a call compares equal to the same call's argument only in this form (LTX's
    ``rope_interpolation_scale`` is a tuple in the call, a list in the manifest)."""
    if isinstance(value, (tuple, list)):
        return [json_form(v) for v in value]
    if isinstance(value, dict):
        return {k: json_form(v) for k, v in value.items()}
    return value


def bind_call(module: nn.Module, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """A call's arguments by the forward's parameter names (``**kwargs`` entries spread out)."""
    signature = inspect.signature(module.forward)
    bound = dict(signature.bind_partial(*args, **kwargs).arguments)
    for name, param in signature.parameters.items():
        if param.kind is inspect.Parameter.VAR_KEYWORD and isinstance(bound.get(name), dict):
            bound.update(bound.pop(name))
    return bound
