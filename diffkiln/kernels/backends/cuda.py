"""The CUDA backend: Triton int8 GEMMs for every shape (fused quantisation and dequantisation) and for
packed 4-, 3- and 2-bit weights; cuBLASLt (``torch._int_mm``) where triton is missing."""

from __future__ import annotations

import functools
import importlib
import warnings
from collections.abc import Callable

import torch

from diffkiln.kernels.backends.base import (
    GenericStaticLinear,
    SlowKernelWarning,
    register_backend,
    unpacked_quant_matmul,
    unpacked_weight_only_matmul,
)
from diffkiln.kernels.backends.cpu import CpuBackend

__all__ = ["CudaBackend"]


@register_backend("cuda")
class CudaBackend(CpuBackend):
    """Triton int8 kernels for every shape (quantisation and dequantisation fused, see
    :mod:`diffkiln.kernels.triton_int8`) and for packed 4-, 3- and 2-bit weights; without triton,
    torch._int_mm (cuBLASLt) padded to its documented rules, which it may still refuse."""

    name = "cuda"

    def int_mm(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        kernel = _triton_kernel("triton_int8", "quant_matmul_triton")
        if kernel is not None:
            return kernel(a, b, None)
        return _cublaslt_int_mm(a, b)

    def quant_matmul(self, x, w, scale, bias, pertoken_scale, output_dtype):
        kernel = _triton_kernel("triton_int8", "quant_matmul_triton")
        if kernel is None:
            return super().quant_matmul(x, w, scale, bias, pertoken_scale, output_dtype)
        return kernel(x, w, scale, bias, pertoken_scale, output_dtype)

    def dynamic_quant(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        kernel: Callable[..., tuple[torch.Tensor, torch.Tensor]] | None
        kernel = _triton_kernel("triton_int8", "dynamic_quant_triton")  # type: ignore[assignment]
        return super().dynamic_quant(x) if kernel is None else kernel(x)

    def packed_quant_matmul(self, x, w, scale, bias, pertoken_scale, output_dtype, zero_point):
        kernel = _triton_kernel("triton_lowbit", "packed_quant_matmul_triton")
        if kernel is None:
            return unpacked_quant_matmul(self, x, w, scale, bias, pertoken_scale, output_dtype, zero_point)
        return kernel(x, w, scale, bias, pertoken_scale, output_dtype, zero_point)

    def packed_weight_only_matmul(self, x, w, scale, bias):
        kernel = _triton_kernel("triton_lowbit", "packed_weight_only_matmul_triton")
        if kernel is None:
            return unpacked_weight_only_matmul(self, x, w, scale, bias)
        return kernel(x, w, scale, bias)

    def prepack_static_linear(self, w_q, w_scale, bias, act):
        linear_class = _triton_kernel("triton_static", "TritonStaticLinear")
        if linear_class is None:
            return GenericStaticLinear(self, w_q, w_scale, bias, act)
        return linear_class(w_q, w_scale, bias, act)

    def prepack_static_conv(self, w_q, w_scale, bias, act, geometry):
        conv_class = _triton_kernel("triton_conv", "TritonStaticConv")
        if conv_class is None or geometry.groups != 1:
            return None  # im2col + the static GEMM
        return conv_class(w_q, w_scale, bias, act, geometry)


def _cublaslt_int_mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """torch._int_mm padded to its documented rules (M > 16, K and N multiples of 8). cuBLASLt's
    own heuristics may still refuse a shape (CUBLAS_STATUS_NOT_SUPPORTED): install triton."""
    m, k = a.shape
    n = b.shape[1]
    pm, pk, pn = max(17 - m, 0) + (-max(m, 17)) % 8, (-k) % 8, (-n) % 8
    if pm or pk or pn:
        # Zero padding leaves the exact integer products of the real rows/columns unchanged.
        a = torch.nn.functional.pad(a, (0, pk, 0, pm))
        b = torch.nn.functional.pad(b, (0, pn, 0, pk))
        return torch._int_mm(a, b)[:m, :n]
    return torch._int_mm(a, b)


@functools.cache
def _triton_kernel(module: str, name: str) -> Callable[..., torch.Tensor] | None:
    """A Triton kernel of ``diffkiln.kernels.<module>`` by name, or None (with a SlowKernelWarning,
    once per kernel) where triton is missing."""
    try:
        loaded = importlib.import_module(f"diffkiln.kernels.{module}")
    except ImportError:
        warnings.warn(
            "triton is not installed, so int8 GEMMs on CUDA run on cuBLASLt (which refuses some shapes) "
            "and 4-, 3- and 2-bit layers unpack their weights on every call; `pip install triton` "
            "runs every shape, fused, and reads packed weights inside the kernel",
            SlowKernelWarning,
            stacklevel=3,
        )
        return None
    kernel: Callable[..., torch.Tensor] = getattr(loaded, name)
    return kernel
