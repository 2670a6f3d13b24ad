"""Swap quantized modules into a denoiser, by qualified name, from frozen tensors."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

import diffkiln.nn.conv  # noqa: F401 - registers the integer convolutions
from diffkiln.nn.qmodules import qmodule_for
from diffkiln.nn.timestep import install_step_selector

__all__ = ["replace_layers"]

_FLOAT_TYPES: dict[str, type[nn.Module]] = {
    "linear": nn.Linear,
    "conv1d": nn.Conv1d,
    "conv": nn.Conv2d,
    "conv3d": nn.Conv3d,
}


def replace_layers(
    denoiser: nn.Module, tensors: dict[str, dict[str, torch.Tensor]], metas: dict[str, dict[str, Any]]
) -> nn.Module:
    """Replace each named layer of ``denoiser`` with its quantized module, in place.

    Args:
        denoiser: the model whose layers are replaced (its float weights for those layers are dropped).
        tensors: per layer name, the frozen tensors (see :mod:`diffkiln.nn.qmodules`).
        metas: per layer name, the construction metadata, including ``kind``
            (:data:`diffkiln.core.layers.LAYER_KINDS`).

    Raises:
        KeyError: a named layer does not exist in the denoiser, or its kind has no quantized module.
    """
    modules = dict(denoiser.named_modules())
    for name, layer_tensors in tensors.items():
        if name not in modules:
            raise KeyError(f"layer {name!r} is not in {type(denoiser).__name__}; the bundle does not fit this model")
        meta = metas[name]
        qcls = qmodule_for(_FLOAT_TYPES[meta["kind"]])
        parent_name, _, child = name.rpartition(".")
        parent = modules[parent_name] if parent_name else denoiser
        setattr(parent, child, qcls(layer_tensors, meta))
    install_step_selector(denoiser)
    return denoiser
