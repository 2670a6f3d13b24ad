"""What a block-sparse mask search needs from one attention call, at a block granularity.

For query block ``i`` and key block ``j`` of head ``h`` (blocks of ``block`` tokens, the last one
may be shorter):

* ``mass[h, i, j]``: the attention probability the queries of block ``i`` give the keys of block
  ``j``, averaged over those queries (each row sums to 1 over ``j``);
* ``drop_error[h, i, j]``: the mean L2 error of those queries' attention outputs when block ``j``
  alone is dropped from their softmax. Dropping it renormalizes the rest, so with ``m`` the query's
  mass on the block and ``o_j`` the block's probability-weighted mean value, the output moves by
  ``m / (1 - m) * |o_j - out|`` exactly (dropping a block that holds all of a query's mass is
  reported as ``inf``).

Both are averaged over the batch. Computed in float32 from the probabilities, one head and one
chunk of query blocks at a time.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["block_attention_stats"]

_CHUNK_FLOATS = 1 << 24
"""Attention probabilities held at once (64 MB in float32)."""


def _block_sum(x: torch.Tensor, dim: int, block: int) -> torch.Tensor:
    """Sum ``x`` over consecutive groups of ``block`` along ``dim`` (the last group may be short)."""
    n = x.shape[dim]
    pad = -n % block
    if pad:
        shape = list(x.shape)
        shape[dim] = pad
        x = torch.cat([x, x.new_zeros(shape)], dim=dim)
    shape = list(x.shape)
    shape[dim : dim + 1] = [shape[dim] // block, block]
    return x.reshape(shape).sum(dim + 1)


def block_attention_stats(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, block: int, scale: float | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(mass, drop_error)``, each ``(heads, query_blocks, key_blocks)`` (see the module docstring).

    Args:
        query: ``(batch, heads, q_len, head_dim)``.
        key: ``(batch, heads, kv_len, head_dim)``.
        value: ``(batch, heads, kv_len, head_dim_v)``.
        block: tokens per block.
        scale: softmax scale; None: ``1/sqrt(head_dim)``.
    """
    batch, heads, q_len, dim = query.shape
    kv_len = key.shape[2]
    scale = dim**-0.5 if scale is None else scale
    q_sizes = _block_sum(torch.ones(q_len), 0, block)
    # Query rows per chunk (whole blocks): bounds the probabilities held at once.
    rows = max(block, (_CHUNK_FLOATS // max(batch * kv_len, 1)) // block * block)
    masses, errors = [], []
    for h in range(heads):
        k, v = key[:, h].float(), value[:, h].float()
        kb = -(-kv_len // block)
        v_blocks = F.pad(v, (0, 0, 0, kb * block - kv_len)).view(batch, kb, block, -1)
        mass_h, err_h = [], []
        for start in range(0, q_len, rows):
            q = query[:, h, start : start + rows].float()
            p = torch.softmax(q @ k.transpose(-1, -2) * scale, dim=-1)  # (batch, rows, kv_len)
            out = p @ v  # (batch, rows, dv)
            m = _block_sum(p, 2, block)  # (batch, rows, kb): each query's mass per key block
            p_blocks = F.pad(p, (0, kb * block - kv_len)).view(batch, p.shape[1], kb, block)
            weighted = torch.einsum("brkt,bktd->brkd", p_blocks, v_blocks)  # (batch, rows, kb, dv)
            o_block = weighted / m.clamp_min(1e-30).unsqueeze(-1)
            dist = (o_block - out.unsqueeze(2)).norm(dim=-1)
            err = torch.where(m < 1 - 1e-7, m / (1 - m).clamp_min(1e-30) * dist, torch.full_like(m, float("inf")))
            mass_h.append(_block_sum(m, 1, block).mean(0))
            err_h.append(_block_sum(err, 1, block).mean(0))
        masses.append(torch.cat(mass_h) / q_sizes[:, None])
        errors.append(torch.cat(err_h) / q_sizes[:, None])
    return torch.stack(masses), torch.stack(errors)
