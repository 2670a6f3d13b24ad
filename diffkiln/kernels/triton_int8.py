"""Triton int8 GEMMs for the CUDA backend, for every shape, with quantisation and dequantisation fused.

Why not cuBLASLt alone: ``torch._int_mm`` refuses shapes by rules that depend on M, K and N
together (on an H200 it refused (17, 64, 32), (100, 32, 128) and a K = 64 layer of shapes-dit
after padding M past 16 and K, N to multiples of 8), so padding is a guess, not a contract. These
kernels take any (M, K, N): masked tiles, int8 tensor-core dots, an int32 accumulator.

Three kernels, each one launch:

* :func:`static_linear_triton`: a static W8A8 linear from *float* activations. The prologue
  quantises each loaded tile on the layer's grid (``clamp(round(x / s) + z)``, as
  :meth:`~diffkiln.kernels.ActGrid.quantize` on the CPU: IEEE division, ties to even), so no int8
  copy of the activations is written; the epilogue folds the zero point (``- z * colsum(W)``),
  dequantises, adds the float bias and writes the caller's dtype (bfloat16 or float16 directly).
* :func:`quant_matmul_triton`: ``quant_matmul``'s contract on int8 codes
  (``((x @ w + bias) * scale * pertoken_scale[:, None]).to(output_dtype)``); with no scale it is
  ``int_mm`` (int32 out).
* :func:`dynamic_quant_triton`: per-row symmetric int8 quantisation in one kernel (row absmax,
  then the codes).

Everything the kernels read is on the device: the timestep-aware grid is two scalars, the BOS rows
are handled by the caller, and nothing syncs with the host.

Hardware status: checked in Triton's CPU interpreter (``TRITON_INTERPRET=1``,
tests/kernels/test_triton_int8.py: bit-exact against the CPU backend); the ``gpu``-marked shape
sweep and ``tools/bench_gpu.py`` have not run on a GPU yet, and the tile sizes are untuned.
"""

from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl

__all__ = [
    "dynamic_quant_triton",
    "load_step_grid",
    "quant_matmul_triton",
    "quantize_tile",
    "round_half_even",
    "static_linear_stepped_triton",
    "static_linear_triton",
    "step_tables",
    "to_bfloat16",
]


@triton.jit
def round_half_even(v):
    """``torch.round`` of float32 values: adding 1.5 * 2**23 rounds to an integer, ties to even,
    for |v| < 2**22 (beyond that every int8 code saturates anyway). No libdevice call: Triton's
    interpreter has none."""
    v = tl.minimum(tl.maximum(v, -4194304.0), 4194304.0)
    return (v + 12582912.0) - 12582912.0


@triton.jit
def to_bfloat16(v):
    """float32 -> bfloat16, rounding to nearest even as torch does, from the bits (Triton's
    interpreter truncates its own casts to bfloat16; on a GPU this is what ``cvt.rn`` computes)."""
    u = v.to(tl.uint32, bitcast=True)
    u = u + 0x7FFF + ((u >> 16) & 1)
    return (u >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)


@triton.jit
def quantize_tile(x, act_scale, zp, qmin, qmax):
    """Codes of float32 ``x`` on a static grid, as float: ``clamp(round(x / s) + z, qmin, qmax)``
    with IEEE division and ties to even (:meth:`~diffkiln.kernels.ActGrid.quantize`'s arithmetic)."""
    return tl.minimum(tl.maximum(round_half_even(tl.math.div_rn(x, act_scale)) + zp, qmin), qmax)


@triton.jit
def load_step_grid(step_ptr, table_ptr, N):
    """A timestep-aware layer's grid for the step index at ``step_ptr``, from its (S, 4) table:
    (scale, zero point, lowest code, highest code, offset of the step's row of epilogue scales)."""
    step = tl.load(step_ptr).to(tl.int32)
    act_scale = tl.load(table_ptr + step * 4)
    zp = tl.load(table_ptr + step * 4 + 1).to(tl.int32)
    return act_scale, zp, tl.load(table_ptr + step * 4 + 2), tl.load(table_ptr + step * 4 + 3), step * N


@triton.jit
def _int8_gemm_kernel(
    a_ptr,
    b_ptr,
    out_ptr,
    scale_ptr,
    tok_ptr,
    ibias_ptr,
    fbias_ptr,
    colsum_ptr,
    step_ptr,
    table_ptr,
    M,
    N,
    K,
    stride_am,
    stride_bk,
    act_scale,
    ZP,
    QMIN,
    QMAX,
    QUANT_A: tl.constexpr,
    STEPPED: tl.constexpr,
    INT_OUT: tl.constexpr,
    HAS_TOK: tl.constexpr,
    HAS_IBIAS: tl.constexpr,
    HAS_FBIAS: tl.constexpr,
    HAS_ZP: tl.constexpr,
    OUT_BF16: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
):
    rm = tl.program_id(0) * BM + tl.arange(0, BM)
    rn = tl.program_id(1) * BN + tl.arange(0, BN)
    m_ok, n_ok = rm < M, rn < N
    scale_row = 0
    if STEPPED:  # a timestep-aware layer: this step's grid and scales, read from device memory
        act_scale, ZP, QMIN, QMAX, scale_row = load_step_grid(step_ptr, table_ptr, N)
    acc = tl.zeros((BM, BN), dtype=tl.int32)
    for k0 in range(0, K, BK):
        rk = k0 + tl.arange(0, BK)
        k_ok = rk < K
        a_mask = m_ok[:, None] & k_ok[None, :]
        if QUANT_A:
            x = tl.load(a_ptr + rm[:, None] * stride_am + rk[None, :], mask=a_mask, other=0.0).to(tl.float32)
            q = quantize_tile(x, act_scale, ZP, QMIN, QMAX)
            # Outside the matrix the code must be 0, not the zero point: the colsum term covers K only.
            a = tl.where(a_mask, q, 0.0).to(tl.int8)
        else:
            a = tl.load(a_ptr + rm[:, None] * stride_am + rk[None, :], mask=a_mask, other=0)
        b = tl.load(b_ptr + rk[:, None] * stride_bk + rn[None, :], mask=k_ok[:, None] & n_ok[None, :], other=0)
        acc += tl.dot(a, b, out_dtype=tl.int32)
    if HAS_ZP:  # (q - z) @ W = q @ W - z * colsum(W)
        acc -= ZP * tl.load(colsum_ptr + rn, mask=n_ok, other=0)[None, :]
    if HAS_IBIAS:
        acc += tl.load(ibias_ptr + rn, mask=n_ok, other=0)[None, :]
    mask = m_ok[:, None] & n_ok[None, :]
    if INT_OUT:
        tl.store(out_ptr + rm[:, None] * N + rn[None, :], acc, mask=mask)
    else:
        out = acc.to(tl.float32) * tl.load(scale_ptr + scale_row + rn, mask=n_ok, other=0.0)[None, :]
        if HAS_TOK:
            out = out * tl.load(tok_ptr + rm, mask=m_ok, other=0.0)[:, None]
        if HAS_FBIAS:
            out = out + tl.load(fbias_ptr + rn, mask=n_ok, other=0.0)[None, :]
        if OUT_BF16:
            tl.store(out_ptr + rm[:, None] * N + rn[None, :], to_bfloat16(out), mask=mask)
        else:
            tl.store(out_ptr + rm[:, None] * N + rn[None, :], out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _dynamic_quant_kernel(x_ptr, q_ptr, s_ptr, M, K, stride_xm, BM: tl.constexpr, BK: tl.constexpr):
    rm = tl.program_id(0) * BM + tl.arange(0, BM)
    m_ok = rm < M
    absmax = tl.zeros((BM,), dtype=tl.float32)
    for k0 in range(0, K, BK):
        rk = k0 + tl.arange(0, BK)
        mask = m_ok[:, None] & (rk < K)[None, :]
        x = tl.load(x_ptr + rm[:, None] * stride_xm + rk[None, :], mask=mask, other=0.0).to(tl.float32)
        absmax = tl.maximum(absmax, tl.max(tl.abs(x), axis=1))
    scale = tl.where(absmax > 0, tl.math.div_rn(absmax, tl.full((BM,), 127.0, tl.float32)), 1.0)
    tl.store(s_ptr + rm, scale, mask=m_ok)
    for k0 in range(0, K, BK):
        rk = k0 + tl.arange(0, BK)
        mask = m_ok[:, None] & (rk < K)[None, :]
        x = tl.load(x_ptr + rm[:, None] * stride_xm + rk[None, :], mask=mask, other=0.0).to(tl.float32)
        q = tl.minimum(tl.maximum(round_half_even(tl.math.div_rn(x, scale[:, None])), -128.0), 127.0)
        tl.store(q_ptr + rm[:, None] * K + rk[None, :], q.to(tl.int8), mask=mask)


def _tiles(m: int) -> tuple[int, int, int]:
    # tl.dot needs 16 rows at least; small M (a batch of text tokens) wastes less in small tiles.
    return (16 if m <= 16 else 32 if m <= 32 else 64), 64, 64


def _rows(x: torch.Tensor) -> torch.Tensor:
    """``x`` with unit stride along its rows' elements (a row stride of its own is fine)."""
    return x if x.stride(-1) == 1 else x.contiguous()


def _gemm(
    a: torch.Tensor,
    w: torch.Tensor,
    out_dtype: torch.dtype,
    scale: torch.Tensor | None,
    *,
    tok: torch.Tensor | None = None,
    ibias: torch.Tensor | None = None,
    fbias: torch.Tensor | None = None,
    grid: tuple[float, int, int, int] | None = None,
    colsum: torch.Tensor | None = None,
    step: torch.Tensor | None = None,
    table: torch.Tensor | None = None,
) -> torch.Tensor:
    if a.dim() != 2 or w.dim() != 2 or a.shape[1] != w.shape[0] or w.dtype != torch.int8:
        raise ValueError(f"(M, K) @ int8 (K, N) expected, got {a.dtype} {tuple(a.shape)} @ {w.dtype} {tuple(w.shape)}")
    act_scale, zp, qmin, qmax = grid if grid is not None else (1.0, 0, -128, 127)
    return _int8_gemm_op(_rows(a), _rows(w), scale, tok, ibias, fbias, colsum, step, table, float(act_scale), int(zp),
                         int(qmin), int(qmax), grid is not None or step is not None, out_dtype)  # fmt: skip


# A custom op, so that torch.compile keeps a denoiser with these layers in one graph (an opaque
# node with a fake implementation for tracing) and CUDA graphs can capture the launch.
@torch.library.custom_op("diffkiln::int8_gemm", mutates_args=())
def _int8_gemm_op(
    a: torch.Tensor,
    w: torch.Tensor,
    scale: torch.Tensor | None,
    tok: torch.Tensor | None,
    ibias: torch.Tensor | None,
    fbias: torch.Tensor | None,
    colsum: torch.Tensor | None,
    step: torch.Tensor | None,
    table: torch.Tensor | None,
    act_scale: float,
    zp: int,
    qmin: int,
    qmax: int,
    quant_a: bool,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    (m, k), n = a.shape, w.shape[1]
    out = torch.empty(m, n, dtype=out_dtype, device=a.device)
    if m == 0 or n == 0:
        return out
    bm, bn, bk = _tiles(m)
    # Absent tensors get a valid pointer; their loads are compiled out by the flags.
    dummy = out
    _int8_gemm_kernel[(triton.cdiv(m, bm), triton.cdiv(n, bn))](
        a,
        w,
        out,
        dummy if scale is None else scale,
        dummy if tok is None else tok,
        dummy if ibias is None else ibias,
        dummy if fbias is None else fbias,
        dummy if colsum is None else colsum,
        dummy if step is None else step,
        dummy if table is None else table,
        m,
        n,
        k,
        a.stride(0),
        w.stride(0),
        act_scale,
        zp,
        float(qmin),
        float(qmax),
        QUANT_A=quant_a,
        STEPPED=step is not None,
        INT_OUT=scale is None,
        HAS_TOK=tok is not None,
        HAS_IBIAS=ibias is not None,
        HAS_FBIAS=fbias is not None,
        HAS_ZP=quant_a and (zp != 0 or step is not None),
        OUT_BF16=out_dtype == torch.bfloat16,
        BM=bm,
        BN=bn,
        BK=bk,
    )
    return out


@_int8_gemm_op.register_fake
def _int8_gemm_shape(a, w, scale, tok, ibias, fbias, colsum, step, table, *scalars_and_dtype):
    return a.new_empty(a.shape[0], w.shape[1], dtype=scalars_and_dtype[-1])


def _vector(t: torch.Tensor | None, n: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor | None:
    return None if t is None else t.to(device=device, dtype=dtype).reshape(-1).expand(n).contiguous()


def quant_matmul_triton(
    x: torch.Tensor,
    w: torch.Tensor,
    scale: torch.Tensor | None,
    bias: torch.Tensor | None = None,
    pertoken_scale: torch.Tensor | None = None,
    output_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """``((x @ w + bias) * scale * pertoken_scale[:, None]).to(output_dtype)`` in one kernel; with
    ``scale=None``, the exact int32 ``x @ w`` (``int_mm``).

    Args:
        x: int8 (M, K) codes.
        w: int8 (K, N) codes.
        scale: float (N,) or (1,) dequantisation scale, or None for the int32 accumulator.
        bias: int32 (N,) added to the accumulator, or None. Default None.
        pertoken_scale: float (M,) per-row scales, or None. Default None.
        output_dtype: the result's float dtype. Default float32.

    Raises:
        ValueError: shapes or dtypes that do not fit (the message names them).
    """
    if x.dtype != torch.int8:
        raise ValueError(f"x must be int8, got {x.dtype}")
    n, dev = w.shape[-1], x.device
    if scale is None:
        return _gemm(x, w, torch.int32, None, ibias=_vector(bias, n, torch.int32, dev))
    return _gemm(
        x,
        w,
        output_dtype,
        _vector(scale, n, torch.float32, dev),
        tok=None if pertoken_scale is None else pertoken_scale.to(device=dev, dtype=torch.float32).contiguous(),
        ibias=_vector(bias, n, torch.int32, dev),
    )


def static_linear_triton(
    x: torch.Tensor,
    w: torch.Tensor,
    scale: torch.Tensor,
    colsum: torch.Tensor,
    bias: torch.Tensor | None,
    grid: tuple[float, int, int, int],
    output_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """A static W8A8 linear from float activations in one kernel:
    ``((q(x) - z) @ w) * scale + bias``, q quantising on ``grid``.

    Args:
        x: float32, float16 or bfloat16 (M, K) activations.
        w: int8 (K, N) weight codes.
        scale: float32 (N,): activation scale x weight scale (as the CPU backend multiplies them).
        colsum: int32 (N,) column sums of ``w``.
        bias: float32 (N,) or None.
        grid: (scale, zero point, lowest code, highest code) of the activation grid.
        output_dtype: the result's float dtype. Default float32.

    Raises:
        ValueError: shapes or dtypes that do not fit (the message names them).
    """
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"x must be float32, float16 or bfloat16, got {x.dtype}")
    return _gemm(x, w, output_dtype, scale, fbias=bias, grid=grid, colsum=colsum)


def static_linear_stepped_triton(
    x: torch.Tensor,
    w: torch.Tensor,
    scales: torch.Tensor,
    colsum: torch.Tensor,
    bias: torch.Tensor | None,
    table: torch.Tensor,
    step: torch.Tensor,
    output_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """:func:`static_linear_triton` for a timestep-aware layer, its step chosen on the device.

    Args:
        x: float (M, K) activations.
        w: int8 (K, N) weight codes.
        scales: float32 (S, N): each step's activation scale x weight scale.
        colsum: int32 (N,) column sums of ``w``.
        bias: float32 (N,) or None.
        table: float32 (S, 4): each step's (scale, zero point, lowest code, highest code).
        step: a 0-d integer tensor on x's device: which step (no host sync).
        output_dtype: the result's float dtype. Default float32.
    """
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"x must be float32, float16 or bfloat16, got {x.dtype}")
    return _gemm(x, w, output_dtype, scales, fbias=bias, colsum=colsum, step=step, table=table)


def step_tables(grids: list[Any], w_scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The device tables of a timestep-aware layer's grids: float32 (S, 4) (scale, zero point,
    lowest code, highest code) and (S, N) epilogue scales, each formed as the CPU backend forms it
    (``grid.scale * w_scale``), so each step is bit-exact against its own unfused call."""
    table = torch.tensor([[g.scale, g.zero_point, g.qmin, g.qmax] for g in grids], dtype=torch.float32)
    scales = torch.stack([g.scale * w_scale for g in grids])
    return table.to(w_scale.device), scales.contiguous()


def dynamic_quant_triton(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``dynamic_quant``'s contract in one kernel: int8 (M, K) codes and float32 (M,) scales,
    ``s = absmax(row) / 127`` (1 for an all-zero row), ``q = round(x / s)``.

    Raises:
        ValueError: x is not a 2-D float tensor.
    """
    if x.dim() != 2 or not x.is_floating_point():
        raise ValueError(f"x must be a float (M, K) tensor, got {x.dtype} {tuple(x.shape)}")
    return _dynamic_quant_op(_rows(x))


@torch.library.custom_op("diffkiln::dynamic_quant_int8", mutates_args=())
def _dynamic_quant_op(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    m, k = x.shape
    q = torch.empty(m, k, dtype=torch.int8, device=x.device)
    s = torch.empty(m, dtype=torch.float32, device=x.device)
    if m:
        _dynamic_quant_kernel[(triton.cdiv(m, 16),)](x, q, s, m, k, x.stride(0), BM=16, BK=128)
    return q, s


@_dynamic_quant_op.register_fake
def _dynamic_quant_shape(x):
    return x.new_empty(x.shape, dtype=torch.int8), x.new_empty(x.shape[0], dtype=torch.float32)
