"""MindIE-SD's block-sparse attention op, re-implemented from its own source to test our export
against the consumer rather than against our writer.

Source read: Ascend/MindIE-SD, ``mindiesd/layers/flash_attn/sparse_flash_attn_rf_v3.py``
(``get_mask_index``, ``get_blockwise_mask``, ``rain_fusion_attention``) and
``sparse_flash_attn.py`` (``sparse_attention``, which calls it). ``rain_fusion_attention`` takes
``select_idx`` ``(query_blocks, heads, key_blocks)`` int64 (per row the kept key blocks ascending,
then -1) and ``select_num_idx`` ``(query_blocks, heads)`` (how many are kept), ``blockshape``
``[128, 128]``, the ``TND`` layout (``(tokens of every sample, heads, dim)``) and per-sample
lengths (``[q_seq] * batch``, as ``sparse_attention`` passes them); one mask serves every sample.

Nothing here imports diffkiln.
"""

from __future__ import annotations

import math

import torch


class ContractError(Exception):
    """An input the op would reject (wrong dtype, shape, padding or block size)."""


def rain_fusion_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, select_idx: torch.Tensor,
                          select_num_idx: torch.Tensor, blockshape: list[int], *, actual_seq_qlen: list[int],
                          actual_seq_kvlen: list[int], head_num: int, scale: float,
                          q_input_layout: str = "TND") -> tuple[torch.Tensor, None]:  # fmt: skip
    """Each sample's query block ``i`` of head ``h`` attends to its key blocks
    ``select_idx[i, h, :select_num_idx[i, h]]``; softmax over those keys only."""
    if q_input_layout != "TND" or blockshape != [128, 128]:
        raise ContractError("the op runs TND with blockshape [128, 128]")
    if select_idx.dtype != torch.int64 or select_idx.dim() != 3 or select_idx.shape[1] != head_num:
        raise ContractError("select_idx is int64 (query_blocks, heads, key_blocks)")
    bq, bk = blockshape
    out = torch.empty_like(query)
    q0 = k0 = 0
    for q_len, kv_len in zip(actual_seq_qlen, actual_seq_kvlen, strict=True):
        if select_idx.shape[0] != math.ceil(q_len / bq) or select_idx.shape[2] != math.ceil(kv_len / bk):
            raise ContractError("select_idx does not fit the sequence lengths at this block shape")
        for i in range(select_idx.shape[0]):
            rows = slice(q0 + i * bq, q0 + min((i + 1) * bq, q_len))
            for h in range(head_num):
                n = int(select_num_idx[i, h])
                kept, pad = select_idx[i, h, :n].tolist(), select_idx[i, h, n:]
                if n == 0 or kept != sorted(set(kept)) or min(kept) < 0 or bool((pad != -1).any()):
                    raise ContractError(f"row ({i}, {h}): kept blocks ascending, then -1 padding")
                cols = torch.cat([torch.arange(b * bk, min((b + 1) * bk, kv_len)) for b in kept]) + k0
                scores = (query[rows, h] @ key[cols, h].T) * scale
                out[rows, h] = torch.softmax(scores, dim=-1) @ value[cols, h]
        q0, k0 = q0 + q_len, k0 + kv_len
    return out, None
