"""A Triton static W8A8 2-D convolution as an implicit GEMM: no im2col tensor in memory.

Each program computes a tile of (output pixels x output channels). Its K loop walks the flattened
(input channel, kernel row, kernel column) axis, in F.unfold's order, which is the layout of the
layer's int8 codes (K, N); it gathers the float input values under the kernel window straight from
the NCHW tensor, quantises them on the layer's static grid in registers (as
:func:`diffkiln.kernels.triton_int8.static_linear_triton` does: IEEE division, ties to even, clamp),
and feeds int8 tensor-core dots. Zero padding reads 0.0, whose code is the zero point, exactly as
the im2col path's padded zeros. The epilogue subtracts ``zero_point x colsum(W)``, dequantises,
adds the bias and writes NCHW in the activations' dtype.

Hardware status: checked in Triton's CPU interpreter (tests/kernels/test_triton_conv.py: bit-exact
against im2col and the CPU backend's integer GEMM); not yet run on a GPU; tiles untuned.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from diffkiln.kernels.backends.base import ActGrid, ConvGeometry
from diffkiln.kernels.triton_int8 import load_step_grid, quantize_tile, to_bfloat16
from diffkiln.kernels.triton_static import PreparedStatic

__all__ = ["TritonStaticConv", "static_conv_triton"]


@triton.jit
def _conv_kernel(
    x_ptr,
    w_ptr,
    out_ptr,
    scale_ptr,
    bias_ptr,
    colsum_ptr,
    step_ptr,
    table_ptr,
    B,
    H,
    W,
    OH,
    OW,
    N,
    K,
    sxb,
    sxc,
    sxh,
    sxw,
    act_scale,
    ZP,
    QMIN,
    QMAX,
    SH,
    SW,
    PH,
    PW,
    DH,
    DW,
    KH: tl.constexpr,
    KW: tl.constexpr,
    STEPPED: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_ZP: tl.constexpr,
    OUT_BF16: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
):
    rm = tl.program_id(0) * BM + tl.arange(0, BM)
    rn = tl.program_id(1) * BN + tl.arange(0, BN)
    m_ok, n_ok = rm < B * OH * OW, rn < N
    b = rm // (OH * OW)
    oh = (rm % (OH * OW)) // OW
    ow = rm % OW
    scale_row = 0
    if STEPPED:  # a timestep-aware layer: this step's grid and scales, read from device memory
        act_scale, ZP, QMIN, QMAX, scale_row = load_step_grid(step_ptr, table_ptr, N)
    acc = tl.zeros((BM, BN), dtype=tl.int32)
    for k0 in range(0, K, BK):
        rk = k0 + tl.arange(0, BK)
        k_ok = rk < K
        c = rk // (KH * KW)
        ky = (rk % (KH * KW)) // KW
        kx = rk % KW
        ih = oh[:, None] * SH - PH + ky[None, :] * DH
        iw = ow[:, None] * SW - PW + kx[None, :] * DW
        inside = m_ok[:, None] & k_ok[None, :] & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        x = tl.load(x_ptr + b[:, None] * sxb + c[None, :] * sxc + ih * sxh + iw * sxw, mask=inside, other=0.0)
        a = quantize_tile(x.to(tl.float32), act_scale, ZP, QMIN, QMAX).to(tl.int8)  # padding: the code of 0.0
        # beyond K the weights load as 0, so whatever code a holds there adds nothing
        w = tl.load(w_ptr + rk[:, None] * N + rn[None, :], mask=k_ok[:, None] & n_ok[None, :], other=0)
        acc += tl.dot(a, w, out_dtype=tl.int32)
    if HAS_ZP:  # (q - z) @ W = q @ W - z * colsum(W)
        acc -= ZP * tl.load(colsum_ptr + rn, mask=n_ok, other=0)[None, :]
    out = acc.to(tl.float32) * tl.load(scale_ptr + scale_row + rn, mask=n_ok, other=0.0)[None, :]
    if HAS_BIAS:
        out = out + tl.load(bias_ptr + rn, mask=n_ok, other=0.0)[None, :]
    dst = out_ptr + (b * N * OH * OW + oh * OW + ow)[:, None] + rn[None, :] * (OH * OW)
    mask = m_ok[:, None] & n_ok[None, :]
    if OUT_BF16:
        tl.store(dst, to_bfloat16(out), mask=mask)
    else:
        tl.store(dst, out.to(out_ptr.dtype.element_ty), mask=mask)


def _out_size(size: int, kernel: int, stride: int, pad: int, dil: int) -> int:
    return (size + 2 * pad - dil * (kernel - 1) - 1) // stride + 1


@torch.library.custom_op("diffkiln::static_conv_int8", mutates_args=())
def _conv_op(
    x: torch.Tensor,
    w: torch.Tensor,
    scale: torch.Tensor,
    colsum: torch.Tensor,
    bias: torch.Tensor | None,
    step: torch.Tensor | None,
    table: torch.Tensor | None,
    act_scale: float,
    zp: int,
    qmin: int,
    qmax: int,
    kernel: list[int],
    geometry: list[int],
    out_dtype: torch.dtype,
) -> torch.Tensor:
    (bsz, _, h, wid), n = x.shape, w.shape[1]
    kh, kw = kernel
    sh, sw, ph, pw, dh, dw = geometry
    oh, ow = _out_size(h, kh, sh, ph, dh), _out_size(wid, kw, sw, pw, dw)
    out = torch.empty(bsz, n, oh, ow, dtype=out_dtype, device=x.device)
    m = bsz * oh * ow
    if m == 0 or n == 0:
        return out
    bm, bn, bk = (32 if m <= 32 else 64), 64, 64
    _conv_kernel[(triton.cdiv(m, bm), triton.cdiv(n, bn))](
        x, w, out, scale, out if bias is None else bias, colsum, out if step is None else step,
        out if table is None else table, bsz, h, wid, oh, ow, n, w.shape[0], *x.stride(),
        act_scale, zp, float(qmin), float(qmax), sh, sw, ph, pw, dh, dw,
        KH=kh, KW=kw, STEPPED=step is not None, HAS_BIAS=bias is not None, HAS_ZP=zp != 0 or step is not None,
        OUT_BF16=out_dtype == torch.bfloat16,
        BM=bm, BN=bn, BK=bk,
    )  # fmt: skip
    return out


@_conv_op.register_fake
def _conv_shape(x, w, scale, colsum, bias, step, table, act_scale, zp, qmin, qmax, kernel, geometry, out_dtype):
    sh, sw, ph, pw, dh, dw = geometry
    oh, ow = _out_size(x.shape[2], kernel[0], sh, ph, dh), _out_size(x.shape[3], kernel[1], sw, pw, dw)
    return x.new_empty(x.shape[0], w.shape[1], oh, ow, dtype=out_dtype)


def static_conv_triton(
    x: torch.Tensor,
    w: torch.Tensor,
    scale: torch.Tensor,
    colsum: torch.Tensor,
    bias: torch.Tensor | None,
    grid: ActGrid,
    kernel: tuple[int, int],
    geometry: ConvGeometry,
    output_dtype: torch.dtype = torch.float32,
    steps: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """A static W8A8 convolution of float NCHW ``x`` in one kernel, no im2col.

    Args:
        x: float32, float16 or bfloat16 (B, C, H, W).
        w: int8 (C * kh * kw, O) codes, F.unfold's order along K.
        scale: float32 (O,): activation scale x weight scale.
        colsum: int32 (O,) column sums of ``w``.
        bias: float32 (O,) or None.
        grid: the activation grid.
        kernel: (kh, kw).
        geometry: stride, padding and dilation (groups must be 1).
        output_dtype: the result's float dtype. Default float32.
        steps: a timestep-aware layer's (S, 4) grid table and 0-d step index on x's device
            (:func:`~diffkiln.kernels.triton_int8.step_tables`); ``scale`` is then (S, O) and
            ``grid`` is not read. Default None.

    Raises:
        ValueError: grouped convolutions, or shapes and dtypes that do not fit (named in the message).
    """
    if geometry.groups != 1:
        raise ValueError(f"the implicit-GEMM convolution takes groups=1, got {geometry.groups}")
    if x.dim() != 4 or x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"x must be a float (B, C, H, W) tensor, got {x.dtype} {tuple(x.shape)}")
    if w.dtype != torch.int8 or w.shape[0] != x.shape[1] * kernel[0] * kernel[1]:
        raise ValueError(f"w must be int8 ({x.shape[1] * kernel[0] * kernel[1]}, O), got {w.dtype} {tuple(w.shape)}")
    g = geometry
    table, step = steps if steps is not None else (None, None)
    return _conv_op(x, w.contiguous(), scale, colsum, bias, step, table, float(grid.scale), int(grid.zero_point),
                    grid.qmin, grid.qmax, list(kernel), [*g.stride, *g.padding, *g.dilation], output_dtype)  # fmt: skip


class TritonStaticConv(PreparedStatic):
    """A prepared static W8A8 2-D convolution (implicit GEMM, one launch)."""

    def __init__(
        self, w_q: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None, act: ActGrid, geometry: ConvGeometry
    ) -> None:
        super().__init__(w_q.reshape(w_q.shape[0], -1).t(), w_scale, bias, act)
        self.geometry = geometry
        self.kernel = (int(w_q.shape[2]), int(w_q.shape[3]))

    def call_step(self, x: torch.Tensor, grids: list[ActGrid], step: torch.Tensor) -> torch.Tensor:
        """A timestep-aware layer's call on the grid of ``step`` (a 0-d device tensor): no host sync."""
        table, scales = self.tables_for(grids)
        return static_conv_triton(x, self.w_t, scales, self.colsum, self.bias, grids[0], self.kernel, self.geometry,
                                  self.out_dtype(x), (table, step))  # fmt: skip

    def __call__(self, x: torch.Tensor, act: ActGrid | None = None) -> torch.Tensor:
        grid = act or self.act
        return static_conv_triton(x, self.w_t, self.scale_for(grid), self.colsum, self.bias, grid, self.kernel,
                                  self.geometry, self.out_dtype(x))  # fmt: skip
