"""Pure-torch references of the integer kernels. Exact integer math, then float scaling.

Every backend kernel implements the same contract as these functions and is tested against them:
bit-exact for the integer accumulation, and within float rounding for the scaled output.
"""

from __future__ import annotations

import torch

__all__ = [
    "dynamic_quant_per_token_reference",
    "int_mm_reference",
    "quant_matmul_reference",
    "weight_only_matmul_reference",
]


def int_mm_reference(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """int8 [M, K] @ int8 [K, N] -> int32 [M, N], accumulated exactly in int64 then narrowed.

    Args:
        a: int8 activations, shape (M, K).
        b: int8 weights, shape (K, N).
    """
    if a.dtype != torch.int8 or b.dtype != torch.int8:
        raise TypeError(f"int_mm needs int8 inputs, got {a.dtype} and {b.dtype}")
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[0]:
        raise ValueError(f"int_mm needs (M, K) @ (K, N), got {tuple(a.shape)} @ {tuple(b.shape)}")
    return (a.to(torch.int64) @ b.to(torch.int64)).to(torch.int32)


def quant_matmul_reference(
    x: torch.Tensor,
    w: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    pertoken_scale: torch.Tensor | None = None,
    output_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """``((x @ w + bias) * scale * pertoken_scale[:, None]).to(output_dtype)``.

    This is the contract of ``torch_npu.npu_quant_matmul`` with a float output, which every
    backend of :func:`diffkiln.kernels.quant_matmul` follows.

    Args:
        x: int8 (M, K).
        w: int8 (K, N).
        scale: float32 (N,) or (1,): per-output-channel (or per-tensor) dequantisation scale.
        bias: int32 (N,) added to the integer accumulator, or None.
        pertoken_scale: float32 (M,) per-row activation scale (dynamic per-token), or None.
        output_dtype: float dtype of the result. Default float32.
    """
    acc = int_mm_reference(x, w)
    if bias is not None:
        acc = acc + bias.to(torch.int32)
    out = acc.to(torch.float32) * scale.to(torch.float32)
    if pertoken_scale is not None:
        out = out * pertoken_scale.to(torch.float32)[:, None]
    return out.to(output_dtype)


def dynamic_quant_per_token_reference(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 quantisation of each row: ``q = round(x / s)``, ``s = absmax(row) / 127``.

    The contract of ``torch_npu.npu_dynamic_quant``. All-zero rows get scale 1.

    Args:
        x: float (M, K).

    Returns:
        (int8 (M, K), float32 (M,) scales).
    """
    absmax = x.detach().abs().amax(dim=-1).to(torch.float32)
    scale = torch.where(absmax > 0, absmax / 127.0, torch.ones_like(absmax))
    q = torch.clamp(torch.round(x.to(torch.float32) / scale[..., None]), -128, 127).to(torch.int8)
    return q, scale


def weight_only_matmul_reference(
    x: torch.Tensor,
    w: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    output_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """``x @ (w * scale) + bias``: float activations against integer weights dequantized per column.

    The contract of ``torch_npu.npu_weight_quant_batchmatmul`` without offsets (symmetric
    weights), used for layers whose activations stay in floating point (W4A16, W8A16).

    Args:
        x: float (M, K).
        w: int8 (K, N) codes (4-, 3- and 2-bit codes unpacked to int8).
        scale: float (N,) per-output-channel scale.
        bias: float (N,) or None.
        output_dtype: float dtype of the result. Default float32.
    """
    if w.dtype != torch.int8:
        raise TypeError(f"weight-only matmul needs int8 weight codes, got {w.dtype}")
    out = x.to(torch.float32) @ (w.to(torch.float32) * scale.to(torch.float32)[None, :])
    if bias is not None:
        out = out + bias.to(torch.float32)
    return out.to(output_dtype)
