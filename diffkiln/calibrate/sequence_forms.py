"""The forms a denoiser's token-sequence inputs take, as one (batch, length, width) tensor: a plain
3-D tensor, encoder layers stacked in front of the batch (HiDream's Llama states), or a list of
per-sample tensors of different lengths (Z-Image's)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

__all__ = ["batch_size", "nan_padded", "sequence_tensor", "stacked_layers"]


def stacked_layers(shape: Any, batch: int) -> bool:
    """Whether a 4-D shape is encoder layers stacked in front of the batch: (layers, batch, ...)."""
    return len(shape) == 4 and shape[1] == batch != shape[0]


def batch_size(value: Any) -> int:
    """The batch of a main input: a tensor's first size, or a per-sample list's length."""
    if isinstance(value, torch.Tensor):
        return int(value.shape[0]) if value.dim() else 0
    return len(value) if isinstance(value, (list, tuple)) else 0


def sequence_tensor(value: Any, batch: int = 0) -> torch.Tensor | None:
    """A token-sequence input as one (batch, length, width) tensor: a 3-D tensor itself; stacked
    layers (layers, ``batch``, length, width) with each layer's rows side by side in the width (a
    position is the same token in every layer); a list of per-sample (length, width) tensors
    stacked, the shorter ones padded with NaN (Z-Image drops each prompt's padding, so lengths
    differ: NaN marks a position that sample does not have). None for anything else."""
    if isinstance(value, torch.Tensor):
        if stacked_layers(value.shape, batch):
            return value.permute(1, 2, 0, 3).flatten(2)
        return value if value.dim() == 3 else None
    rows = list(value) if isinstance(value, (list, tuple)) else []
    matrices = rows and all(isinstance(v, torch.Tensor) and v.dim() == 2 for v in rows)
    if matrices and len({v.shape[1] for v in rows}) == 1:
        return nan_padded([v.unsqueeze(0) for v in rows])
    return None


def nan_padded(parts: list[torch.Tensor]) -> torch.Tensor:
    """(batch, length, width) tensors joined over the batch as float32, each padded with NaN to
    the longest."""
    longest = max(p.shape[1] for p in parts)
    return torch.cat([F.pad(p.float(), (0, 0, 0, longest - p.shape[1]), value=float("nan")) for p in parts])
