"""Resident denoiser memory at run time: the bytes of every tensor a loaded denoiser keeps.

Counted after at least one call, so backend caches built on first use are included: unique
storages of parameters and buffers (int8 and packed weights, scales, FP layers), plus each
quantized layer's backend-prepared weights. oneDNN's prepacked weights are opaque tensors without
a shareable storage; they hold the same int8 values reordered and count as their element bytes
(one per weight). Tensors that a
call creates and frees (sub-byte weights unpacked for that call) are not resident.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["resident_bytes"]


def _storage_key(t: torch.Tensor) -> tuple[int, str]:
    return (t.untyped_storage().data_ptr(), str(t.device))


def resident_bytes(denoiser: nn.Module) -> int:
    """Bytes the denoiser keeps resident (see the module docstring).

    Args:
        denoiser: a runtime denoiser (quantized layers from :mod:`diffkiln.nn.qmodules`) or
            a float one.
    """
    seen: set[tuple[int, str]] = set()
    total = 0

    def add(t: torch.Tensor | None) -> None:
        nonlocal total
        if t is None or t.is_meta:
            return
        if t.is_mkldnn or t.layout != torch.strided:
            # oneDNN's prepacked weights are opaque tensors without a storage to share.
            total += t.numel() * t.element_size()
            return
        key = _storage_key(t)
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()

    for t in [*denoiser.parameters(), *denoiser.buffers()]:
        add(t)
    for module in denoiser.modules():
        for cache_name in ("_packed", "_direct"):
            for prepared in getattr(module, cache_name, {}).values():
                if prepared is None:
                    continue
                for value in vars(prepared).values():
                    if isinstance(value, torch.Tensor):
                        add(value)
    return total
