"""4- and 2-bit Linear weights in onnxruntime's ``com.microsoft.MatMulNBits`` layout.

MatMulNBits holds ``B`` as uint8 (N, blocks, block_size * bits / 8): unsigned codes packed
low-first along K, zero point ``2^(bits-1)``, and one float scale per (row, block). diffkiln's
packed rows use the same bit order with signed codes, so a code's unsigned form is its top bit
flipped (``q + 8`` for 4 bits, ``q + 2`` for 2 bits): the conversion is exact.

* Per-channel weights repeat the row's scale in every block. The block size (a power of two, 16 to
  256: the sizes onnxruntime's MLAS kernels take) is the one that stores the fewest bytes, codes
  with their padding plus the scales.
* Two-level grouped weights (``w = q * m * s``) take ``block_size = group_size`` and the block scale
  ``m * s``: a float16 scale times an integer up to 15 is exact in float32, so the file still holds
  4- or 2-bit codes (the standard-ONNX export has to store grouped codes as int8).
"""

from __future__ import annotations

import torch

from diffkiln.core.packing import packed_length, unpack_weights
from diffkiln.kernels.backends import PackedWeights

__all__ = ["NBITS_BITS", "NBITS_BLOCK_SIZES", "nbits_block_size", "nbits_dequantize", "to_matmulnbits"]

NBITS_BITS = (2, 4)
"""Code widths exported as MatMulNBits (onnxruntime 1.32's CPU kernel runs 2, 4 and 8; 3-bit codes
keep the INT4 DequantizeLinear form, 8-bit ones the int8 QDQ form onnxruntime already fuses)."""

NBITS_BLOCK_SIZES = (16, 32, 64, 128, 256)
"""Block sizes MLAS's low-bit GEMM kernels take (others fall back to a dequantize-then-GEMM path)."""

_TOP_BITS = {4: 0x88, 2: 0xAA}


def nbits_block_size(k: int, bits: int, group_size: int | None) -> int | None:
    """The MatMulNBits block size for a row of ``k`` codes, or None when the layout cannot hold it.

    Args:
        k: the GEMM's K (input features).
        bits: 2 or 4.
        group_size: the two-level group size, or None (per-channel scales).
    """
    if bits not in NBITS_BITS:
        return None
    if group_size is not None:
        return group_size if group_size in NBITS_BLOCK_SIZES else None

    def bits_per_row(block: int) -> int:
        blocks = -(-k // block)
        return blocks * block * bits + 32 * blocks  # codes with padding, float32 scales

    return min(NBITS_BLOCK_SIZES, key=lambda block: (bits_per_row(block), -block))


def to_matmulnbits(w: PackedWeights, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int] | None:
    """``(B, scales, block_size)`` for MatMulNBits from a layer's packed weights, or None.

    Args:
        w: the resident packed weights (:class:`~diffkiln.kernels.backends.PackedWeights`).
        scale: the per-channel scales (N,), float16 or float32.

    Returns:
        B: uint8 (N, blocks, block_size * bits / 8); scales: float32 (N * blocks,); the block size.
        None when the bit-width or the group size has no MatMulNBits form.
    """
    block = nbits_block_size(w.k, w.bits, w.group_size)
    if block is None:
        return None
    n = w.packed.shape[0]
    blocks = -(-w.k // block)
    row_bytes = blocks * block * w.bits // 8
    if w.packed.shape[1] != packed_length(w.k, w.bits):
        raise ValueError(f"packed rows of {w.packed.shape[1]} bytes do not hold {w.k} {w.bits}-bit codes")
    # Padding bytes are zero codes (unsigned: the zero point), as are diffkiln's own padded codes.
    padded = torch.zeros(n, row_bytes, dtype=torch.uint8)
    padded[:, : w.packed.shape[1]] = w.packed
    b = (padded ^ _TOP_BITS[w.bits]).reshape(n, blocks, row_bytes // blocks)
    per_block = scale.to(torch.float32)[:, None].expand(n, blocks)
    if w.group_mult is not None:
        per_block = per_block * w.group_mult.to(torch.float32)
    return b.contiguous(), per_block.reshape(-1).contiguous(), block


def nbits_dequantize(b: torch.Tensor, scales: torch.Tensor, k: int, bits: int) -> torch.Tensor:
    """The float (N, K) weight a MatMulNBits ``B`` (N, blocks, blob) and ``scales`` (N * blocks) hold.

    Codes are unsigned with the default zero point ``2^(bits-1)``: flipping each code's top bit
    gives the signed two's-complement code in diffkiln's packing (the same low-first bit order).
    """
    n, blocks, blob = b.shape
    block = blob * 8 // bits
    q = unpack_weights(b.reshape(n, blocks * blob) ^ _TOP_BITS[bits], bits, blocks * block)[:, :k]
    per_block = scales.to(torch.float32).reshape(n, blocks)
    return q.to(torch.float32) * per_block.repeat_interleave(block, dim=1)[:, :k]
