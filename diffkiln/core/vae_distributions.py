"""The latent distributions a VAE's ``encode`` returns, by class name: what the ONNX export writes
as the distribution's parameters and the onnxruntime backend rebuilds from them.

Both diffusers classes are built from one tensor, ``parameters`` (the mean and a second statistic,
concatenated on the channel axis), and keep it: the graph returns that tensor and the loader calls
the class on it, so that the pipeline samples the distribution, or takes its mode, in torch. The
manifest names the class; the loader builds only the classes listed here (it imports nothing a
manifest names).
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["DISTRIBUTIONS", "distribution_name", "rebuild_distribution"]

DISTRIBUTIONS = {
    "DiagonalGaussianDistribution": "diffusers.models.autoencoders.vae",
    "OobleckDiagonalGaussianDistribution": "diffusers.models.autoencoders.autoencoder_oobleck",
}
"""Class name -> the diffusers module that defines it: the KL autoencoders' distribution, and
Stable Audio's Oobleck autoencoder's (its second statistic a scale, through a softplus)."""


def _class(name: str) -> type:
    cls: type = getattr(importlib.import_module(DISTRIBUTIONS[name]), name)
    return cls


def distribution_name(value: Any) -> str | None:
    """The name in :data:`DISTRIBUTIONS` of ``value``'s class, or None for any other value."""
    name = type(value).__name__
    return name if name in DISTRIBUTIONS and isinstance(value, _class(name)) else None


def rebuild_distribution(name: str, parameters: Any) -> Any:
    """The distribution ``name`` of ``parameters``, as the VAE's ``encode`` built it.

    Raises:
        KeyError: ``name`` is not in :data:`DISTRIBUTIONS`.
    """
    return _class(name)(parameters)
