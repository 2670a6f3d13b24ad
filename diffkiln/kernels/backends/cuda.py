"""The CUDA backend: cuBLASLt int8 GEMMs (``torch._int_mm``), Triton kernels for packed 4-, 3- and 2-bit weights."""

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
    """torch._int_mm on CUDA (cuBLASLt int8). Pads to its shape rules: M > 16, K and N multiples of 8."""

    name = "cuda"

    def int_mm(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        m, k = a.shape
        n = b.shape[1]
        pm, pk, pn = max(17 - m, 0), (-k) % 8, (-n) % 8
        if pm or pk or pn:
            # Zero padding leaves the exact integer products of the real rows/columns unchanged.
            a = torch.nn.functional.pad(a, (0, pk, 0, pm))
            b = torch.nn.functional.pad(b, (0, pn, 0, pk))
            return torch._int_mm(a, b)[:m, :n]
        return torch._int_mm(a, b)

    def packed_quant_matmul(self, x, w, scale, bias, pertoken_scale, output_dtype, zero_point):
        kernel = _triton_kernel("packed_quant_matmul_triton")
        if kernel is None:
            return unpacked_quant_matmul(self, x, w, scale, bias, pertoken_scale, output_dtype, zero_point)
        return kernel(x, w, scale, bias, pertoken_scale, output_dtype, zero_point)

    def packed_weight_only_matmul(self, x, w, scale, bias):
        kernel = _triton_kernel("packed_weight_only_matmul_triton")
        if kernel is None:
            return unpacked_weight_only_matmul(self, x, w, scale, bias)
        return kernel(x, w, scale, bias)

    def prepack_static_linear(self, w_q, w_scale, bias, act):
        return GenericStaticLinear(self, w_q, w_scale, bias, act)

    def prepack_static_conv(self, w_q, w_scale, bias, act, geometry):
        return None  # im2col + cuBLASLt GEMM


@functools.cache
def _triton_kernel(name: str) -> Callable[..., torch.Tensor] | None:
    """A Triton packed-weight kernel of diffkiln.kernels.triton_lowbit by name, or None (with a
    SlowKernelWarning, once) where triton is missing."""
    try:
        module = importlib.import_module("diffkiln.kernels.triton_lowbit")
    except ImportError:
        warnings.warn(
            "triton is not installed, so 4-, 3- and 2-bit layers on CUDA unpack their weights to int8 "
            "on every call before cuBLASLt; `pip install triton` reads them packed inside the kernel",
            SlowKernelWarning,
            stacklevel=3,
        )
        return None
    kernel: Callable[..., torch.Tensor] = getattr(module, name)
    return kernel
