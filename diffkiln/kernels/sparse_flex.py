"""Block-sparse attention through PyTorch's FlexAttention: the path for CUDA (compiled Triton
kernels that skip the blocks a ``BlockMask`` leaves out).

The :class:`~diffkiln.kernels.sparse_attention.BlockLayout` becomes a ``BlockMask`` at the layout's
block size (built once per layout and device). Compiled (``compiled=True``), ``flex_attention``
runs inductor's generated kernels, which skip the blocks the mask leaves out: Triton on CUDA, C++
on CPU. Eager, it runs the mask densely underneath (for checking the contract only). Not yet run
on a GPU here: checked on CPU, eager and compiled, against the dense masked reference.
"""

from __future__ import annotations

from typing import Any

import torch

from diffkiln.kernels.sparse_attention import BlockLayout

__all__ = ["flex_block_sparse_attention"]

_MASKS: dict[tuple[int, str], Any] = {}
_COMPILED: dict[str, Any] = {}


def _block_mask(layout: BlockLayout, device: torch.device) -> Any:
    """The layout as a ``BlockMask``, built from its block indices directly: ``create_block_mask``
    would evaluate a mask function over every (query, key) token pair, a tensor of heads x q x kv
    int64 values (25 GB at 16k tokens and 12 heads)."""
    from torch.nn.attention.flex_attention import BlockMask

    key = (id(layout), str(device))
    if key not in _MASKS:
        counts = (layout.indices >= 0).sum(-1).to(torch.int32)
        indices = torch.zeros(layout.heads, layout.q_blocks, layout.kv_blocks, dtype=torch.int32)
        indices[..., : layout.indices.shape[-1]] = layout.indices.clamp_min(0)
        blocks, blk = layout.to_mask().to(device), layout.block

        def mask_mod(b: Any, h: Any, q_idx: Any, kv_idx: Any) -> Any:
            return blocks[h, q_idx // blk, kv_idx // blk]  # what eager FlexAttention evaluates

        # The kept blocks are *full* blocks: compiled kernels run them without calling mask_mod.
        none = torch.zeros_like(counts)[None].to(device)
        mask = BlockMask.from_kv_blocks(none, torch.zeros_like(indices)[None].to(device), counts[None].to(device),
                                        indices[None].to(device), BLOCK_SIZE=blk, mask_mod=mask_mod,
                                        seq_lengths=(layout.q_len, layout.kv_len))  # fmt: skip
        _MASKS[key] = (layout, mask)
    return _MASKS[key][1]


def flex_block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: BlockLayout,
    scale: float | None = None,
    compiled: bool = True,
) -> torch.Tensor:
    """Attention over the layout's kept blocks with FlexAttention (contract of
    :func:`~diffkiln.kernels.sparse_attention.sparse_attention_reference`).

    Args:
        compiled: run ``torch.compile``'d FlexAttention (compiled once per device and shape; the
            first call of a shape pays the compile). False runs it eagerly, densely underneath.
    """
    from torch.nn.attention.flex_attention import flex_attention

    fn = flex_attention
    if compiled:
        fn = _COMPILED.setdefault(q.device.type, torch.compile(flex_attention, dynamic=False))
    out: torch.Tensor = fn(q, k, v, block_mask=_block_mask(layout, q.device), scale=scale)
    return out
