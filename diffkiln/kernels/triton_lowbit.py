"""Triton GEMMs that read packed sub-byte weights and unpack them inside the kernel: W{4,3,2}A8
(int8 activations, tensor-core int8 dots) and weight-only W{4,3,2}A16 (float activations).

The CUDA path for 4-, 3- and 2-bit weights without this kernel unpacks a layer's codes to an int8
tensor per call and then runs cuBLASLt: one extra write and read of K x N bytes per layer and call,
and a transient int8 copy of the layer. Here each program loads the packed bytes of its (K, N)
tile, decodes the codes in registers (two-level group multipliers included) and feeds tensor-core
int8 dots with an int32 accumulator; the epilogue is ``packed_quant_matmul``'s contract:
``(((x - zero_point) @ W + bias) * scale * pertoken_scale[:, None]).to(output_dtype)``, with the
weights' row sums for the zero point taken from the same decoded tiles (nothing extra resident).
The weight-only kernel decodes the same tiles to the activations' float dtype and accumulates in
float32 (``packed_weight_only_matmul``'s contract: ``x @ (W * scale) + bias``).

The weights are :func:`diffkiln.core.packing.pack_weights`'s little-endian bit stream, so code
``k`` of a row starts at bit ``k * bits``; a 3-bit code may straddle two bytes, which the kernel
reads together as a 16-bit window.

Hardware status: checked in Triton's CPU interpreter only (``TRITON_INTERPRET=1``,
tests/kernels/test_triton_lowbit.py: bit-exact integer results for W*A8, float results against the
float op for W*A16); neither kernel has run on a GPU yet, and their tile sizes are untuned.
Imported lazily by the CUDA backend, only where triton is installed.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import triton
import triton.language as tl

if TYPE_CHECKING:
    from diffkiln.kernels.backends import PackedWeights

__all__ = ["packed_quant_matmul_triton", "packed_weight_only_matmul_triton"]


@triton.jit
def _decode_tile(p_ptr, mult_ptr, rk, rn, K, N, KB, G, GROUP: tl.constexpr, BITS: tl.constexpr, HAS_MULT: tl.constexpr):
    """int32 (BK, BN) GEMM codes of the packed rows ``rn`` at inputs ``rk`` (0 outside the matrix)."""
    bit = rk * BITS
    byte = bit // 8
    tile_ok = (rk < K)[:, None] & (rn < N)[None, :]
    row = rn[None, :] * KB
    lo = tl.load(p_ptr + row + byte[:, None], mask=tile_ok, other=0).to(tl.int32)
    # The second byte matters only to a 3-bit code that straddles a byte boundary.
    hi = tl.load(p_ptr + row + byte[:, None] + 1, mask=tile_ok & (byte[:, None] + 1 < KB), other=0).to(tl.int32)
    code = ((lo | (hi << 8)) >> (bit % 8)[:, None]) & ((1 << BITS) - 1)
    code = tl.where(code >= (1 << (BITS - 1)), code - (1 << BITS), code)  # two's complement
    if HAS_MULT:
        g = tl.load(mult_ptr + rn[None, :] * G + (rk // GROUP)[:, None], mask=tile_ok, other=0).to(tl.int32)
        code = code * g  # |code x multiplier| <= 8 x 15: still int8
    return code


@triton.jit
def _tile_rows_cols(M, N, BM: tl.constexpr, BN: tl.constexpr):
    """This program's output rows and columns, and which of them lie inside the (M, N) result."""
    rm = tl.program_id(0) * BM + tl.arange(0, BM)
    rn = tl.program_id(1) * BN + tl.arange(0, BN)
    return rm, rn, rm < M, rn < N


@triton.jit
def _packed_a8_kernel(
    x_ptr,
    p_ptr,
    mult_ptr,
    scale_ptr,
    bias_ptr,
    tok_ptr,
    out_ptr,
    M,
    N,
    K,
    KB,
    G,
    ZP,
    GROUP: tl.constexpr,
    BITS: tl.constexpr,
    HAS_MULT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_TOK: tl.constexpr,
    HAS_ZP: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
):
    rm, rn, m_ok, n_ok = _tile_rows_cols(M, N, BM, BN)
    acc = tl.zeros((BM, BN), dtype=tl.int32)
    colsum = tl.zeros((BN,), dtype=tl.int32)
    for k0 in range(0, K, BK):
        rk = k0 + tl.arange(0, BK)
        k_ok = rk < K
        a = tl.load(x_ptr + rm[:, None] * K + rk[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0)
        code = _decode_tile(p_ptr, mult_ptr, rk, rn, K, N, KB, G, GROUP, BITS, HAS_MULT)
        acc += tl.dot(a, code.to(tl.int8), out_dtype=tl.int32)
        if HAS_ZP:
            colsum += tl.sum(code, axis=0)
    if HAS_ZP:
        acc -= ZP * colsum[None, :]  # (x - z) @ W = x @ W - z * colsum(W)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=n_ok, other=0)[None, :]
    out = acc.to(tl.float32) * tl.load(scale_ptr + rn, mask=n_ok, other=0.0)[None, :]
    if HAS_TOK:
        out = out * tl.load(tok_ptr + rm, mask=m_ok, other=0.0)[:, None]
    mask = m_ok[:, None] & n_ok[None, :]
    tl.store(out_ptr + rm[:, None] * N + rn[None, :], out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _packed_a16_kernel(
    x_ptr,
    p_ptr,
    mult_ptr,
    scale_ptr,
    bias_ptr,
    out_ptr,
    M,
    N,
    K,
    KB,
    G,
    GROUP: tl.constexpr,
    BITS: tl.constexpr,
    HAS_MULT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    IEEE: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
):
    rm, rn, m_ok, n_ok = _tile_rows_cols(M, N, BM, BN)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, K, BK):
        rk = k0 + tl.arange(0, BK)
        a = tl.load(x_ptr + rm[:, None] * K + rk[None, :], mask=m_ok[:, None] & (rk < K)[None, :], other=0.0)
        code = _decode_tile(p_ptr, mult_ptr, rk, rn, K, N, KB, G, GROUP, BITS, HAS_MULT)
        # Codes (|q| <= 120) are exact in float16 and bfloat16: the dot runs in the activations'
        # dtype with float32 accumulation; float32 activations take full-precision (not TF32) dots.
        if IEEE:
            acc += tl.dot(a, code.to(tl.float32), input_precision="ieee")
        else:
            acc += tl.dot(a, code.to(a.dtype), out_dtype=tl.float32)
    out = acc * tl.load(scale_ptr + rn, mask=n_ok, other=0.0)[None, :]
    if HAS_BIAS:
        out += tl.load(bias_ptr + rn, mask=n_ok, other=0.0)[None, :]
    mask = m_ok[:, None] & n_ok[None, :]
    tl.store(out_ptr + rm[:, None] * N + rn[None, :], out, mask=mask)


def _block_m(m: int) -> int:
    # tl.dot needs tiles of at least 16 rows; small batches (M <= 32) waste less with smaller tiles.
    return 16 if m <= 16 else 32 if m <= 32 else 64


def _launch(x: torch.Tensor, w: PackedWeights, scale: torch.Tensor, output_dtype: torch.dtype) -> tuple[Any, ...]:
    """What both kernels take alike: (grid, out, leading arguments, scale, trailing arguments,
    constexpr keywords). Checks the packed weights.

    Raises:
        ValueError: packed weights that are not uint8 (N, bytes), or multipliers without a group size.
    """
    packed, mult = w.packed, w.group_mult
    if packed.dtype != torch.uint8 or packed.dim() != 2:
        raise ValueError(f"packed weights must be uint8 (N, bytes), got {packed.dtype} {tuple(packed.shape)}")
    if (mult is None) != (w.group_size is None):
        raise ValueError("group multipliers and group_size go together")
    m, n = x.shape[0], packed.shape[0]
    bm, bn, bk = _block_m(m), 64, 64
    grid = (triton.cdiv(m, bm), triton.cdiv(n, bn))
    out = torch.empty(m, n, dtype=output_dtype, device=x.device)
    scale = scale.to(device=x.device, dtype=torch.float32).reshape(-1).expand(n).contiguous()
    # An absent multiplier tensor gets a valid pointer; its loads are compiled out by HAS_MULT.
    lead = (x.contiguous(), packed.contiguous(), packed if mult is None else mult.contiguous())
    sizes = (m, n, w.k, packed.shape[1], 1 if mult is None else mult.shape[1])
    meta = {"GROUP": w.group_size or 1, "BITS": w.bits, "HAS_MULT": mult is not None, "BM": bm, "BN": bn, "BK": bk}
    return grid, out, lead, scale, sizes, meta


def packed_quant_matmul_triton(
    x: torch.Tensor,
    w: PackedWeights,
    scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    pertoken_scale: torch.Tensor | None = None,
    output_dtype: torch.dtype = torch.float32,
    zero_point: int = 0,
) -> torch.Tensor:
    """``(((x - zero_point) @ W + bias) * scale * pertoken_scale[:, None]).to(output_dtype)``, W read packed.

    Args:
        x: int8 (M, K) activation codes.
        w: the packed 4-, 3- or 2-bit weights (N rows), with their group multipliers if any.
        scale: float (N,) or (1,) dequantisation scale (activation scale x weight scale).
        bias: int32 (N,) added to the accumulator, or None. Default None.
        pertoken_scale: float (M,) per-row activation scales, or None. Default None.
        output_dtype: the result's float dtype. Default float32.
        zero_point: the activation codes' zero point. Default 0.

    Raises:
        ValueError: mismatched shapes or dtypes (the message names the tensor).
    """
    if x.dtype != torch.int8 or x.dim() != 2 or x.shape[1] != w.k:
        raise ValueError(f"x must be int8 (M, {w.k}), got {x.dtype} {tuple(x.shape)}")
    grid, out, lead, scale, sizes, meta = _launch(x, w, scale, output_dtype)
    # Unused pointer arguments get a valid tensor; their loads are compiled out by the flags.
    _packed_a8_kernel[grid](
        *lead,
        scale,
        scale if bias is None else bias.to(torch.int32).contiguous(),
        scale if pertoken_scale is None else pertoken_scale.to(torch.float32).contiguous(),
        out,
        *sizes,
        int(zero_point),
        HAS_BIAS=bias is not None,
        HAS_TOK=pertoken_scale is not None,
        HAS_ZP=zero_point != 0,
        **meta,
    )
    return out


def packed_weight_only_matmul_triton(
    x: torch.Tensor, w: PackedWeights, scale: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """``x @ (W * scale) + bias`` in float32 for float activations (weight-only W{4,3,2}A16 layers),
    W read packed and decoded in registers.

    Args:
        x: float32, float16 or bfloat16 (M, K) activations.
        w: the packed weights (N rows), with their group multipliers if any.
        scale: float (N,) per-output-channel scale.
        bias: float (N,) or None. Default None.

    Raises:
        ValueError: mismatched shapes or dtypes (the message names the tensor).
    """
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16) or x.dim() != 2 or x.shape[1] != w.k:
        raise ValueError(f"x must be float (M, {w.k}), got {x.dtype} {tuple(x.shape)}")
    grid, out, lead, scale, sizes, meta = _launch(x, w, scale, torch.float32)
    _packed_a16_kernel[grid](
        *lead,
        scale,
        scale if bias is None else bias.to(torch.float32).contiguous(),
        out,
        *sizes,
        HAS_BIAS=bias is not None,
        IEEE=x.dtype == torch.float32,
        **meta,
    )
    return out
