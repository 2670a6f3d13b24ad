"""The kernel-backend contract, the shared integer-GEMM helpers, and the backend registry.

Each backend (:mod:`~diffkiln.kernels.backends.cpu`, :mod:`~diffkiln.kernels.backends.cuda`,
:mod:`~diffkiln.kernels.backends.npu`) implements :class:`KernelBackend` for one torch device type
and registers itself with :func:`register_backend`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch

from diffkiln.core.packing import unpack_codes

__all__ = [
    "ActGrid",
    "ConvGeometry",
    "GenericStaticLinear",
    "KernelBackend",
    "PackedWeights",
    "SlowKernelWarning",
    "StaticConv",
    "StaticLinear",
    "available_backends",
    "get_backend",
    "register_backend",
    "scaled",
    "static_quant_linear",
    "unpacked_quant_matmul",
    "unpacked_weight_only_matmul",
]


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

    def packed_quant_matmul(
        self,
        x: torch.Tensor,
        w: PackedWeights,
        scale: torch.Tensor,
        bias: torch.Tensor | None,
        pertoken_scale: torch.Tensor | None,
        output_dtype: torch.dtype,
        zero_point: int,
    ) -> torch.Tensor:
        """``(((x - zero_point) @ W + bias) * scale * pertoken_scale[:, None]).to(output_dtype)`` for
        int8 x (M, K) against sub-byte weights ``w`` that stay packed."""
        ...

    def packed_weight_only_matmul(
        self, x: torch.Tensor, w: PackedWeights, scale: torch.Tensor, bias: torch.Tensor | None
    ) -> torch.Tensor:
        """``weight_only_matmul`` (float x, float32 result) against sub-byte weights that stay packed."""
        ...

    def weight_only_matmul(
        self, x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None, bits: int
    ) -> torch.Tensor:
        """``x @ (w * scale) + bias`` for float x (M, K) and int8 codes w (K, N) of ``bits`` bits."""
        ...

    def static_conv_unpacked(
        self,
        x: torch.Tensor,
        w_codes: torch.Tensor,
        w_scale: torch.Tensor,
        bias: torch.Tensor | None,
        act: ActGrid,
        geometry: ConvGeometry,
    ) -> torch.Tensor | None:
        """One exact static-activation integer convolution against codes unpacked for this call, or None."""
        ...

    def prepack_static_linear(
        self, w_q: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None, act: ActGrid
    ) -> StaticLinear:
        """Prepare int8 (N, K) weights for repeated static-activation GEMMs on this backend."""
        ...

    def prepack_static_conv(
        self, w_q: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None, act: ActGrid, geometry: ConvGeometry
    ) -> StaticConv | None:
        """A direct integer convolution for int8 (O, I, kh, kw) weights, or None (then: im2col + GEMM)."""
        ...


@dataclass(frozen=True)
class PackedWeights:
    """A layer's 4-, 3- or 2-bit weights as they stay resident: packed rows, optional group multipliers.

    Attributes:
        packed: uint8 (N, packed_length(k, bits)), :func:`diffkiln.core.packing.pack_weights` layout.
        bits: 2, 3 or 4.
        k: the unpacked row length (the GEMM's K).
        group_mult: uint8 (N, ceil(k / group_size)) two-level group multipliers, or None.
        group_size: inputs per group when ``group_mult`` is given, else None.
    """

    packed: torch.Tensor
    bits: int
    k: int
    group_mult: torch.Tensor | None = None
    group_size: int | None = None

    def codes(self) -> torch.Tensor:
        """int8 (N, K) GEMM codes (code x group multiplier), a transient copy for this call."""
        return unpack_codes(self.packed, self.bits, self.k, self.group_mult, self.group_size)


def unpacked_quant_matmul(
    backend: KernelBackend,
    x: torch.Tensor,
    w: PackedWeights,
    scale: torch.Tensor,
    bias: torch.Tensor | None,
    pertoken_scale: torch.Tensor | None,
    output_dtype: torch.dtype,
    zero_point: int = 0,
) -> torch.Tensor:
    """``packed_quant_matmul`` for backends without a packed kernel: unpack to int8 for this call only
    (the resident copy stays packed), then the backend's int8 ``quant_matmul``."""
    w_t = w.codes().t()
    if zero_point:
        # (x - z) @ W = x @ W - z * colsum(W): the zero point becomes an int32 bias.
        zp_bias = -zero_point * w_t.to(torch.int32).sum(dim=0)
        bias = zp_bias if bias is None else bias + zp_bias
    return backend.quant_matmul(x, w_t, scale, bias, pertoken_scale, output_dtype)


def unpacked_weight_only_matmul(
    backend: KernelBackend, x: torch.Tensor, w: PackedWeights, scale: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """``packed_weight_only_matmul`` for backends without a packed kernel: unpack for this call only,
    then the backend's ``weight_only_matmul`` (which takes the codes' bit-width)."""
    bits = 8 if w.group_mult is not None else w.bits  # code x group multiplier is an int8 code
    return backend.weight_only_matmul(x, w.codes().t(), scale, bias, bits)


@dataclass(frozen=True)
class ActGrid:
    """A static per-tensor activation grid: ``q = clamp(round(x / scale) + zero_point, qmin, qmax)``.

    Attributes:
        scale: step size.
        zero_point: the code of 0.0.
        bits: 8 (codes [-128, 127]) or 7 (codes [-64, 63]). Default 8.
    """

    scale: float
    zero_point: int
    bits: int = 8

    @property
    def qmin(self) -> int:
        """Lowest code."""
        return -(2 ** (self.bits - 1))

    @property
    def qmax(self) -> int:
        """Highest code."""
        return 2 ** (self.bits - 1) - 1

    def quantize(self, x: torch.Tensor, offset: int = 0, dtype: torch.dtype = torch.int8) -> torch.Tensor:
        """The codes of ``x`` (plus ``offset``, e.g. to store them as uint8), as ``dtype``."""
        # One float32 working copy, then in place: the same operations as
        # clamp(round(x / scale) + zp), without a fresh full-size tensor per step.
        q = x.to(torch.float32, copy=True)
        q.div_(self.scale).round_().add_(self.zero_point + offset).clamp_(self.qmin + offset, self.qmax + offset)
        return q.to(dtype)


@dataclass(frozen=True)
class ConvGeometry:
    """A 2-D convolution's stride, padding, dilation and groups."""

    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]
    groups: int = 1


class StaticLinear(Protocol):
    """A prepacked W8A8 linear with a static per-tensor activation grid."""

    def __call__(self, x: torch.Tensor, act: ActGrid | None = None) -> torch.Tensor:
        """float (M, K) -> float32 (M, N): quantise x on the grid, integer GEMM, dequantise.

        ``act`` overrides the prepacked grid for this call (timestep-aware ranges); it must
        have the same bits.
        """
        ...


class StaticConv(Protocol):
    """A prepacked W8A8 2-D convolution with a static per-tensor activation grid."""

    def __call__(self, x: torch.Tensor, act: ActGrid | None = None) -> torch.Tensor:
        """float (B, C, H, W) -> float32 (B, O, H', W'): quantise, integer convolution, dequantise."""
        ...


def static_quant_linear(
    backend: KernelBackend,
    x: torch.Tensor,
    w_t: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None,
    grid: ActGrid,
    colsum: torch.Tensor | None = None,
) -> torch.Tensor:
    """One static W8A8 GEMM without prepacking: quantise x on ``grid``, ``quant_matmul``, add bias.

    Args:
        backend: the kernel backend of x's device.
        x: float (M, K).
        w_t: int8 (K, N) weight codes.
        w_scale: float32 (N,).
        bias: float32 (N,) or None.
        grid: the static activation grid.
        colsum: int32 (N,) column sums of ``w_t`` when already known. Default None (computed).
    """
    q = grid.quantize(x)
    if colsum is None:
        colsum = w_t.to(torch.int32).sum(dim=0)
    # The zero point folds into an int32 bias: (q - z) @ W = q @ W - z * colsum(W).
    zp_bias = -grid.zero_point * colsum
    out = backend.quant_matmul(q, w_t, grid.scale * w_scale, zp_bias, None, torch.float32)
    return out if bias is None else out + bias


class GenericStaticLinear:
    """quant_matmul with the activation zero point folded into an int32 bias (any backend)."""

    def __init__(
        self, backend: KernelBackend, w_q: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None, act: ActGrid
    ):
        self.backend = backend
        self.act = act
        self.w_t = w_q.t().contiguous()
        self.w_scale = w_scale.to(torch.float32)
        self.colsum = w_q.to(torch.int32).sum(dim=1)
        self.bias = None if bias is None else bias.to(torch.float32)

    def __call__(self, x: torch.Tensor, act: ActGrid | None = None) -> torch.Tensor:
        return static_quant_linear(self.backend, x, self.w_t, self.w_scale, self.bias, act or self.act, self.colsum)


class SlowKernelWarning(RuntimeWarning):
    """A bundle runs on an exact but slow integer path on this machine; the message says how to fix it."""


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


def scaled(acc: torch.Tensor, scale: torch.Tensor, pertoken: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """``acc * scale * pertoken[:, None]`` in float32, cast to ``dtype``: an int32 accumulator dequantized."""
    out = acc.to(torch.float32) * scale.to(torch.float32)
    if pertoken is not None:
        out = out * pertoken.to(torch.float32)[:, None]
    return out.to(dtype)
