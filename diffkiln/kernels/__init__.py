"""Integer kernels per backend (cpu / cuda / npu), each beside a pure-torch reference.

Public entry points dispatch on the tensors' device:
* :func:`int_mm`: exact int8 x int8 -> int32 GEMM;
* :func:`quant_matmul`: int8 GEMM + int32 bias + float scales (``npu_quant_matmul``'s contract);
* :func:`dynamic_quant`: symmetric per-token int8 quantisation;
* :func:`weight_only_matmul`: float activations against int8/int4/int2 weight codes
  (``npu_weight_quant_batchmatmul``'s contract);
* :func:`static_linear_unpacked`: a static-activation integer GEMM against weight codes
  unpacked for this call only (sub-byte weights stay packed in memory).
"""

from __future__ import annotations

import torch

from diffkiln.kernels.backends import (
    ActGrid,
    ConvGeometry,
    KernelBackend,
    StaticConv,
    StaticLinear,
    available_backends,
    get_backend,
    register_backend,
    static_quant_linear,
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
    "StaticConv",
    "StaticLinear",
    "available_backends",
    "dynamic_quant",
    "dynamic_quant_per_token_reference",
    "get_backend",
    "int_mm",
    "int_mm_reference",
    "prepack_static_conv",
    "prepack_static_linear",
    "quant_matmul",
    "quant_matmul_reference",
    "register_backend",
    "static_conv_unpacked",
    "static_linear_unpacked",
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


def static_linear_unpacked(
    x: torch.Tensor, w_t: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None, act: ActGrid
) -> torch.Tensor:
    """A static-activation integer GEMM against int8 (K, N) codes that exist for this call only.

    For packed 4-, 3- and 2-bit weights: the caller unpacks them to int8 just before, so the resident
    copy stays packed; no backend prepacking (it would hold an int8 copy).

    Args:
        x: float (M, K).
        w_t: int8 (K, N) codes.
        w_scale: float32 (N,).
        bias: float32 (N,) or None.
        act: the static activation grid.
    """
    return static_quant_linear(get_backend(x.device), x, w_t, w_scale, bias, act)


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
