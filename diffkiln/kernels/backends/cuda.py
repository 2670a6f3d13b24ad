"""The CUDA backend: Triton int8 GEMMs for every shape (fused quantisation and dequantisation) and for
packed 4-, 3- and 2-bit weights; cuBLASLt (``torch._int_mm``) where triton is missing."""

from __future__ import annotations

import functools
import importlib
import warnings
from collections.abc import Callable

import torch

from diffkiln.kernels.backends.base import (
    ActGrid,
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
        kernel = _triton_kernel("triton_int8", "static_linear_triton")
        if kernel is None:
            return GenericStaticLinear(self, w_q, w_scale, bias, act)
        return TritonStaticLinear(kernel, w_q, w_scale, bias, act)

    def prepack_static_conv(self, w_q, w_scale, bias, act, geometry):
        conv_class = _triton_kernel("triton_conv", "TritonStaticConv")
        if conv_class is None or geometry.groups != 1:
            return None  # im2col + the static GEMM
        return conv_class(w_q, w_scale, bias, act, geometry)


class TritonStaticLinear:
    """A static W8A8 linear as one Triton launch: float activations in, the activations' dtype out
    (quantised in the prologue; zero point, scales and bias in the epilogue). It holds the layer's
    only copy of the int8 codes (``holds_codes``)."""

    holds_codes = True

    def __init__(
        self,
        kernel: Callable[..., torch.Tensor],
        w_q: torch.Tensor,
        w_scale: torch.Tensor,
        bias: torch.Tensor | None,
        act: ActGrid,
    ) -> None:
        self.kernel, self.act = kernel, act
        # looked up now, not per call: a traced (torch.compile) call must not import
        self.stepped = _triton_kernel("triton_int8", "static_linear_stepped_triton")
        self.tables = _triton_kernel("triton_int8", "step_tables")
        self.w_t = w_q.t().contiguous()
        self.w_scale = w_scale.to(device=w_q.device, dtype=torch.float32).contiguous()
        self.colsum = w_q.to(torch.int32).sum(dim=1).contiguous()
        self.bias = None if bias is None else bias.to(device=w_q.device, dtype=torch.float32).contiguous()
        self._scales: dict[float, torch.Tensor] = {}
        self._steps: tuple[torch.Tensor, torch.Tensor] | None = None

    def codes_t(self) -> torch.Tensor:
        """The int8 (K, N) weight codes."""
        return self.w_t

    def call_step(self, x: torch.Tensor, grids: list[ActGrid], step: torch.Tensor) -> torch.Tensor:
        """A timestep-aware layer's call on the grid of ``step`` (a 0-d device tensor): no host sync."""
        assert self.stepped is not None and self.tables is not None  # this class exists only where triton does
        if self._steps is None:  # the layer's grids never change: tables made once, kept on the device
            self._steps = self.tables(grids, self.w_scale)  # type: ignore[assignment]
        assert self._steps is not None
        table, scales = self._steps
        out_dtype = x.dtype if x.dtype in (torch.float16, torch.bfloat16) else torch.float32
        return self.stepped(x, self.w_t, scales, self.colsum, self.bias, table, step, out_dtype)

    def __call__(self, x: torch.Tensor, act: ActGrid | None = None) -> torch.Tensor:
        grid = act or self.act
        # activation scale x weight scale, as the CPU backend forms it; one small tensor per grid
        # (a timestep-aware layer has one grid per step range), made once and kept on the device
        scale = self._scales.get(grid.scale)
        if scale is None:
            scale = self._scales.setdefault(grid.scale, (grid.scale * self.w_scale).contiguous())
        out_dtype = x.dtype if x.dtype in (torch.float16, torch.bfloat16) else torch.float32
        return self.kernel(x, self.w_t, scale, self.colsum, self.bias,
                           (grid.scale, grid.zero_point, grid.qmin, grid.qmax), out_dtype)  # fmt: skip


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
