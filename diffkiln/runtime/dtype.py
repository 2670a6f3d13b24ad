"""Run a bundle's floating-point parts in bfloat16 or float16 around its integer layers.

A W8A8 bundle computes its quantized Linear and Conv layers with integer GEMMs; everything else
(attention, normalizations, the layers kept in FP, the text encoders, the VAE) runs in floating
point. On hardware with fast bfloat16 or float16 units (CPUs with AMX or AVX-512 BF16, GPUs, NPUs)
those parts are what a BF16 baseline is fast at, so they should run in that dtype too, as
deployments with MindIE-SD or TensorRT do. The quantized layers keep their scales, grids and
codes exactly as stored (float32 scales, int8 codes) and take and return activations of the
compute dtype: they quantize their input from it and cast their output to it.
"""

from __future__ import annotations

import torch
from torch import nn

from diffkiln.nn.qmodules import quantized_module_types

__all__ = ["COMPUTE_DTYPES", "cast_float_parts"]

COMPUTE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
"""The compute dtypes ``load(..., dtype=...)`` accepts, by name."""


def cast_float_parts(module: nn.Module, dtype: torch.dtype) -> int:
    """Cast the floating-point parameters and buffers of every submodule except quantized layers
    (every class registered with ``register_qmodule``).

    Args:
        module: a component of a loaded bundle (denoiser, text encoder, VAE).
        dtype: torch.float32, torch.bfloat16 or torch.float16.

    Returns:
        The number of quantized layers left as they were.

    Raises:
        ValueError: another dtype.
    """
    if dtype not in COMPUTE_DTYPES.values():
        raise ValueError(f"compute dtype must be one of {sorted(COMPUTE_DTYPES)}, got {dtype}")
    kept = 0
    quantized = quantized_module_types()
    for sub in module.modules():
        if isinstance(sub, quantized):
            kept += 1
            continue
        for p in sub.parameters(recurse=False):
            if p.is_floating_point() and p.dtype != dtype:
                p.data = p.data.to(dtype)
        for name, b in list(sub.named_buffers(recurse=False)):
            if b is not None and b.is_floating_point() and b.dtype != dtype:
                sub._buffers[name] = b.to(dtype)
    return kept
