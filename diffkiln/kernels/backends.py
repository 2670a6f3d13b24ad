"""Integer kernels per backend (cpu, cuda, npu), registered by device type.

Each backend implements :class:`KernelBackend`: an exact int8 GEMM into int32, the fused
``quant_matmul`` (int8 GEMM + int32 bias + float scales, the contract of
``torch_npu.npu_quant_matmul``) and per-token dynamic quantisation. torch_npu is imported lazily,
only when the npu backend is first used, so CPU and CUDA deployments never need it.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any, Protocol

import torch

from diffkiln.kernels.reference import dynamic_quant_per_token_reference

__all__ = ["KernelBackend", "available_backends", "get_backend", "register_backend"]


class KernelBackend(Protocol):
    """The integer-kernel contract every backend implements."""

    name: str

    def int_mm(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """int8 (M, K) @ int8 (K, N) -> int32 (M, N), exact."""
        ...

    def quant_matmul(
        self,
        x: torch.Tensor,
        w: torch.Tensor,
        scale: torch.Tensor,
        bias: torch.Tensor | None,
        pertoken_scale: torch.Tensor | None,
        output_dtype: torch.dtype,
    ) -> torch.Tensor:
        """``((x @ w + bias) * scale * pertoken_scale[:, None]).to(output_dtype)``."""
        ...

    def dynamic_quant(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Symmetric per-row int8 quantisation -> (int8, float32 scales)."""
        ...


_REGISTRY: dict[str, Callable[[], KernelBackend]] = {}
_INSTANCES: dict[str, KernelBackend] = {}


def register_backend(
    device_type: str,
) -> Callable[[Callable[[], KernelBackend]], Callable[[], KernelBackend]]:
    """Class decorator: register a backend factory for a torch device type."""

    def deco(factory: Callable[[], KernelBackend]) -> Callable[[], KernelBackend]:
        _REGISTRY[device_type] = factory
        return factory

    return deco


def available_backends() -> list[str]:
    """Device types with a registered kernel backend."""
    return sorted(_REGISTRY)


def get_backend(device: torch.device | str) -> KernelBackend:
    """The kernel backend for a device.

    Raises:
        KeyError: no backend for that device type; the message lists the valid ones.
    """
    device_type = torch.device(device).type
    if device_type not in _REGISTRY:
        raise KeyError(f"no integer-kernel backend for device type {device_type!r}; valid: {available_backends()}")
    if device_type not in _INSTANCES:
        _INSTANCES[device_type] = _REGISTRY[device_type]()
    return _INSTANCES[device_type]


def _scaled(acc: torch.Tensor, scale: torch.Tensor, pertoken: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    out = acc.to(torch.float32) * scale.to(torch.float32)
    if pertoken is not None:
        out = out * pertoken.to(torch.float32)[:, None]
    return out.to(dtype)


@register_backend("cpu")
class CpuBackend:
    """torch._int_mm on CPU (oneDNN/FBGEMM int8 GEMM)."""

    name = "cpu"

    def int_mm(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch._int_mm(a, b)

    def quant_matmul(self, x, w, scale, bias, pertoken_scale, output_dtype):
        acc = self.int_mm(x, w)
        if bias is not None:
            acc = acc + bias
        return _scaled(acc, scale, pertoken_scale, output_dtype)

    def dynamic_quant(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return dynamic_quant_per_token_reference(x)


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


@register_backend("npu")
class NpuBackend:
    """torch_npu's fused kernels: npu_quant_matmul and npu_dynamic_quant (imported lazily)."""

    name = "npu"

    def __init__(self) -> None:
        try:
            self._npu: Any = importlib.import_module("torch_npu")
        except ImportError as exc:
            raise RuntimeError(
                "the npu backend needs torch_npu; on an Ascend host run `pip install 'diffkiln[npu]'`"
            ) from exc

    def int_mm(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError(
            "torch_npu has no int8 GEMM with an int32 output; use quant_matmul, which fuses the scales"
        )

    def quant_matmul(self, x, w, scale, bias, pertoken_scale, output_dtype):
        # npu_quant_matmul writes float16 or bfloat16 only; a float32 request gets bfloat16, upcast.
        npu_dtype = output_dtype if output_dtype in (torch.float16, torch.bfloat16) else torch.bfloat16
        out = self._npu.npu_quant_matmul(
            x, w, scale.to(torch.float32), pertoken_scale=pertoken_scale, bias=bias, output_dtype=npu_dtype
        )
        return out.to(output_dtype)

    def dynamic_quant(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        q, s = self._npu.npu_dynamic_quant(x)
        return q, s.to(torch.float32)
