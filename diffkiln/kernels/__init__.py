"""Integer kernels per backend (cpu / cuda / npu), each beside a pure-torch reference.

Public entry points dispatch on the tensors' device:
* :func:`int_mm`: exact int8 x int8 -> int32 GEMM;
* :func:`quant_matmul`: int8 GEMM + int32 bias + float scales (``npu_quant_matmul``'s contract);
* :func:`dynamic_quant`: symmetric per-token int8 quantisation;
* :func:`weight_only_matmul`: float activations against int8/int4/int2 weight codes
  (``npu_weight_quant_batchmatmul``'s contract);
* :func:`packed_quant_matmul`: ``quant_matmul`` against 4-, 3- and 2-bit weights that stay packed
  (read packed inside a Triton kernel on CUDA; elsewhere unpacked to int8 for the call only);
* :func:`packed_weight_only_matmul`: ``weight_only_matmul`` against packed weights (the same
  Triton route on CUDA);
* :func:`static_linear_packed`: a static-activation integer GEMM against packed weights.
"""

from __future__ import annotations

import torch

from diffkiln.kernels.backends import (
    ActGrid,
    ConvGeometry,
    KernelBackend,
    PackedWeights,
    StaticConv,
    StaticLinear,
    available_backends,
    get_backend,
    register_backend,
)
from diffkiln.kernels.reference import (
    dynamic_quant_per_token_reference,
    int_mm_reference,
    quant_matmul_reference,
    weight_only_matmul_reference,
)

__all__ = [
    "ActGrid",
    "ConvGeometry",
    "KernelBackend",
    "PackedWeights",
    "StaticConv",
    "StaticLinear",
    "available_backends",
    "dynamic_quant",
    "dynamic_quant_per_token_reference",
    "get_backend",
    "int_mm",
    "int_mm_reference",
    "packed_quant_matmul",
    "packed_weight_only_matmul",
    "prepack_static_conv",
    "prepack_static_linear",
    "quant_matmul",
    "quant_matmul_reference",
    "register_backend",
    "static_conv_unpacked",
    "static_linear_packed",
    "weight_only_matmul",
    "weight_only_matmul_reference",
]


def int_mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Exact int8 (M, K) @ int8 (K, N) -> int32 (M, N) on the inputs' device."""
    return get_backend(a.device).int_mm(a, b)


def quant_matmul(
    x: torch.Tensor,
    w: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    pertoken_scale: torch.Tensor | None = None,
    output_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """``((x @ w + bias) * scale * pertoken_scale[:, None]).to(output_dtype)`` with an int8 GEMM.

    Args:
        x: int8 (M, K) activations.
        w: int8 (K, N) weights.
        scale: float32 (N,) or (1,) dequantisation scale (activation scale x weight scale).
        bias: int32 (N,) added to the accumulator (folds the float bias and any activation zero
            point), or None.
        pertoken_scale: float32 (M,) per-row activation scales (dynamic mode), or None.
        output_dtype: float dtype of the result. Default float32.
    """
    return get_backend(x.device).quant_matmul(x, w, scale, bias, pertoken_scale, output_dtype)


def dynamic_quant(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row int8 quantisation of a float (M, K) tensor -> (int8, float32 (M,) scales)."""
    return get_backend(x.device).dynamic_quant(x)


def prepack_static_linear(
    w_q: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None, act: ActGrid, device: torch.device | str
) -> StaticLinear:
    """Prepare int8 (N, K) per-channel weights for static W8A8 GEMMs on ``device``'s fastest kernel.

    Args:
        w_q: int8 (N, K) weights.
        w_scale: float32 (N,) per-output-channel scales.
        bias: float32 (N,) or None.
        act: the static activation grid.
        device: where the GEMMs will run.

    Returns:
        A callable ``x float (M, K) -> float32 (M, N)``.
    """
    return get_backend(device).prepack_static_linear(w_q, w_scale, bias, act)


def prepack_static_conv(
    w_q: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None,
    act: ActGrid,
    geometry: ConvGeometry,
    device: torch.device | str,
) -> StaticConv | None:
    """A direct integer convolution on ``device``, or None where the backend has none that is exact.

    Args:
        w_q: int8 (O, I, kh, kw) weights.
        w_scale: float32 (O,) per-output-channel scales.
        bias: float32 (O,) or None.
        act: the static activation grid.
        geometry: stride, padding, dilation, groups.
        device: where the convolutions will run.

    Returns:
        A callable ``x float (B, I, H, W) -> float32 (B, O, H', W')``, or None (use im2col + GEMM).
    """
    return get_backend(device).prepack_static_conv(w_q, w_scale, bias, act, geometry)


def weight_only_matmul(
    x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None, bits: int = 8
) -> torch.Tensor:
    """``x @ (w * scale[None, :]) + bias`` in float32, dequantizing the weight inside the kernel.

    Args:
        x: float (M, K) activations (not quantized).
        w: int8 (K, N) weight codes of ``bits`` bits (sub-byte codes unpacked to int8).
        scale: float (N,) per-output-channel scale.
        bias: float (N,) or None. Default None.
        bits: the codes' bit-width, 2, 4 or 8 (backends with a native int4 kernel use it). Default 8.
    """
    return get_backend(x.device).weight_only_matmul(x, w, scale, bias, bits)


def packed_quant_matmul(
    x: torch.Tensor,
    w: PackedWeights,
    scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    pertoken_scale: torch.Tensor | None = None,
    output_dtype: torch.dtype = torch.float32,
    zero_point: int = 0,
) -> torch.Tensor:
    """``(((x - zero_point) @ W + bias) * scale * pertoken_scale[:, None]).to(output_dtype)``
    against sub-byte weights that stay packed.

    Args:
        x: int8 (M, K) activations.
        w: the packed 4-, 3- or 2-bit weights (N rows).
        scale: float32 (N,) or (1,) dequantisation scale.
        bias: int32 (N,) added to the accumulator, or None. Default None.
        pertoken_scale: float32 (M,) per-row activation scales, or None. Default None.
        output_dtype: float dtype of the result. Default float32.
        zero_point: the activation codes' zero point (static asymmetric grids). Default 0.
    """
    return get_backend(x.device).packed_quant_matmul(x, w, scale, bias, pertoken_scale, output_dtype, zero_point)


def packed_weight_only_matmul(
    x: torch.Tensor, w: PackedWeights, scale: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """:func:`weight_only_matmul` (float32 result) against sub-byte weights that stay packed.

    Args:
        x: float (M, K) activations (not quantized).
        w: the packed 4-, 3- or 2-bit weights (N rows).
        scale: float (N,) per-output-channel scale.
        bias: float (N,) or None. Default None.
    """
    return get_backend(x.device).packed_weight_only_matmul(x, w, scale, bias)


def static_linear_packed(
    x: torch.Tensor,
    w: PackedWeights,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None,
    act: ActGrid,
) -> torch.Tensor:
    """A static-activation integer GEMM against packed 4-, 3- or 2-bit weights (no int8 copy kept).

    Args:
        x: float (M, K).
        w: the packed weights.
        w_scale: float32 (N,).
        bias: float32 (N,) or None.
        act: the static activation grid.
    """
    q = act.quantize(x)
    out = packed_quant_matmul(q, w, act.scale * w_scale, None, None, torch.float32, act.zero_point)
    return out if bias is None else out + bias


def static_conv_unpacked(
    x: torch.Tensor,
    w_codes: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None,
    act: ActGrid,
    geometry: ConvGeometry,
) -> torch.Tensor | None:
    """A direct exact integer convolution against codes unpacked for this call, or None (then im2col + GEMM).

    Args:
        x: float (B, I, H, W).
        w_codes: int8 (O, I, kh, kw) codes.
        w_scale: float32 (O,).
        bias: float32 (O,) or None.
        act: the static activation grid.
        geometry: stride, padding, dilation, groups.
    """
    return get_backend(x.device).static_conv_unpacked(x, w_codes, w_scale, bias, act, geometry)
