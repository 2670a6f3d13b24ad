"""Integer kernels per backend (cpu, cuda, npu), registered by device type.

Each backend implements :class:`KernelBackend`: an exact int8 GEMM into int32, the fused
``quant_matmul`` (int8 GEMM + int32 bias + float scales, the contract of
``torch_npu.npu_quant_matmul``) and per-token dynamic quantisation. torch_npu is imported lazily,
only when the npu backend is first used, so CPU and CUDA deployments never need it.
"""

from __future__ import annotations

import functools
import importlib
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from diffkiln.kernels.packing import unpack_codes
from diffkiln.kernels.reference import dynamic_quant_per_token_reference, weight_only_matmul_reference

__all__ = [
    "ActGrid",
    "ConvGeometry",
    "GenericStaticLinear",
    "KernelBackend",
    "OneDnnStaticConv",
    "OneDnnStaticLinear",
    "PackedWeights",
    "SlowKernelWarning",
    "StaticConv",
    "StaticLinear",
    "available_backends",
    "conv2d_on_fp32_units",
    "get_backend",
    "onednn_exact",
    "register_backend",
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
        packed: uint8 (N, packed_length(k, bits)), :func:`diffkiln.kernels.packing.pack_weights` layout.
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


def _uint8_offset(act: ActGrid) -> int:
    # The int8 codes [qmin, qmax] shifted to start at 0: the same integers in uint8 storage, with
    # 8-bit codes in [0, 255] and 7-bit codes in [0, 127] (what keeps AVX2 pair sums in int16).
    return -act.qmin


def _onednn_out_dtype(x: torch.Tensor) -> torch.dtype:
    """oneDNN writes bfloat16 directly for bfloat16 activations: the same values as its float32
    output rounded to bfloat16 (measured bit-identical) without a float32 tensor and a cast (3.6x
    faster on an 8192x640x1920 layer); float32 otherwise."""
    return torch.bfloat16 if x.dtype == torch.bfloat16 else torch.float32


@functools.cache
def _zero_points(n: int) -> torch.Tensor:
    """oneDNN's per-channel weight zero points (all 0, int64): one shared, never-written tensor per
    width, so layers do not each keep 8 bytes per output channel."""
    return torch.zeros(n, dtype=torch.int64)


class OneDnnStaticLinear:
    """x86 CPUs: oneDNN's prepacked u8s8 GEMM (``torch.ops.onednn.qlinear_pointwise``), float32 output
    (bfloat16 for bfloat16 activations)."""

    holds_codes = True  # the prepacked weights give the int8 codes back exactly (codes_t)

    def __init__(self, w_q: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None, act: ActGrid):
        self.act = act
        self.offset = _uint8_offset(act)
        self.packed = torch.ops.onednn.qlinear_prepack(w_q.contiguous(), None)
        self.w_scale = w_scale.to(torch.float32).contiguous()
        self.w_zp = _zero_points(w_q.shape[0])
        self.bias = None if bias is None else bias.to(torch.float32).contiguous()

    def codes_t(self) -> torch.Tensor:
        """The int8 (K, N) weight codes, recovered bit-exactly from the prepacked copy."""
        return self.packed.to_dense().contiguous()

    def __call__(self, x: torch.Tensor, act: ActGrid | None = None) -> torch.Tensor:
        grid = act or self.act
        q = grid.quantize(x, self.offset, torch.uint8)
        zp = grid.zero_point + self.offset
        return torch.ops.onednn.qlinear_pointwise(
            q, grid.scale, zp, self.packed, self.w_scale, self.w_zp, self.bias,
            1.0, 0, _onednn_out_dtype(x), "none", [None], "",
        )  # fmt: skip


class OneDnnStaticConv:
    """x86 CPUs: oneDNN's prepacked u8s8 convolution (``torch.ops.onednn.qconv2d_pointwise``).

    It reads channels-last uint8 input and writes channels-last float32; zero padding is exact,
    because the padded value is the zero point, as for a real zero.
    """

    holds_codes = True  # the prepacked weights give the int8 codes back exactly (codes_t)

    def __init__(
        self, w_q: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None, act: ActGrid, geo: ConvGeometry
    ):
        self.act = act
        self.offset = _uint8_offset(act)
        self.geo = geo
        self.w_scale = w_scale.to(torch.float32).contiguous()
        self.w_zp = _zero_points(w_q.shape[0])
        self.bias = None if bias is None else bias.to(torch.float32).contiguous()
        zp = act.zero_point + self.offset
        self.packed = torch.ops.onednn.qconv_prepack(
            w_q.contiguous(), self.w_scale, act.scale, zp, list(geo.stride), list(geo.padding), list(geo.dilation),
            geo.groups, None,
        )  # fmt: skip

    def codes_t(self) -> torch.Tensor:
        """The int8 (K, N) weight codes (K = in * kh * kw), recovered bit-exactly from the prepacked copy."""
        w = self.packed.to_dense()
        return w.reshape(w.shape[0], -1).t().contiguous()

    def __call__(self, x: torch.Tensor, act: ActGrid | None = None) -> torch.Tensor:
        grid = act or self.act
        q = grid.quantize(x.contiguous(memory_format=torch.channels_last), self.offset, torch.uint8)
        g = self.geo
        return torch.ops.onednn.qconv2d_pointwise(
            q, grid.scale, grid.zero_point + self.offset, self.packed, self.w_scale, self.w_zp, self.bias,
            list(g.stride), list(g.padding), list(g.dilation), g.groups, 1.0, 0, _onednn_out_dtype(x), "none", [], "",
        )  # fmt: skip


@functools.cache
def _cpu_has_vnni() -> bool:
    """True when the CPU has an int8 dot-product unit (AVX512-VNNI, AVX-VNNI or AMX)."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="ignore") as f:
            flags = set(f.read().split())
    except OSError:
        return False
    return bool(flags & {"avx512_vnni", "avx512vnni", "avx_vnni", "amx_int8"})


def _onednn_available() -> bool:
    ops = getattr(torch.ops, "onednn", None)
    ok = ops is not None and hasattr(ops, "qlinear_pointwise") and hasattr(ops, "qconv2d_pointwise")
    return ok and torch.backends.mkldnn.is_available()


def onednn_exact(w_q: torch.Tensor, act: ActGrid) -> bool:
    """True when oneDNN's u8s8 kernels compute these integers exactly on this CPU.

    With VNNI/AMX they always do. Plain AVX2 multiplies through vpmaddubsw, whose int16 sums of
    two u8 x s8 products saturate: measured here, a 77x320x640 product was off by up to 93,334
    (20 dB). A pair sum stays within int16 (|sum| <= 32,767) when activations use 7 bits
    (2 x 127 x 128 = 32,512) or weights lie in [-64, 64] (2 x 255 x 64 = 32,640); then the
    result is exact and the kernel is 2-4x faster than fp32 (BENCHMARKS.md).

    Args:
        w_q: the int8 weights.
        act: the activation grid.
    """
    if not _onednn_available():
        return False
    if _cpu_has_vnni():
        return True
    return act.bits <= 7 or int(w_q.abs().max()) <= 64


class SlowKernelWarning(RuntimeWarning):
    """A bundle runs on an exact but slow integer path on this machine; the message says how to fix it."""


@functools.cache
def _warn_slow_fallback_once() -> None:
    if _onednn_available() and not _cpu_has_vnni():
        warnings.warn(
            "this CPU has no int8 dot-product unit (AVX2 without VNNI), so oneDNN's fast int8 kernels "
            "are exact only on a 7-bit grid; this bundle's 8-bit layers use the exact fallback, which "
            "is slower than FP32. Rebuild with `diffkiln optimize ... --act-bits 7` for the fast path "
            "(see docs/plan-format.md).",
            SlowKernelWarning,
            stacklevel=3,
        )


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


_FP32_EXACT = 2**24 - 1  # every integer up to this magnitude is exact in float32


def int_mm_on_fp32_units(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Exact int8 GEMM computed on float32 units, for CPUs without an int8 dot-product unit.

    Every partial sum of products whose magnitude stays below 2**24 is exact in float32, so each
    K-chunk's float GEMM is the exact integer result; chunks are summed in int32. The chunk length
    follows from the weights' largest magnitude: 1,032 for 8-bit weights (128 x 127 per product),
    a whole layer for 4- and 2-bit codes (18,724 and 131,071). Weights stay integer in memory;
    one layer's chunk is widened per call.
    """
    m, k = a.shape
    b_max = max(int(b.abs().max()), 1) if b.numel() else 1
    chunk = max(1, _FP32_EXACT // (128 * b_max))
    if chunk >= k:
        return (a.to(torch.float32) @ b.to(torch.float32)).to(torch.int32)
    out = torch.zeros(m, b.shape[1], dtype=torch.int32, device=a.device)
    for start in range(0, k, chunk):
        sl = slice(start, start + chunk)
        out += (a[:, sl].to(torch.float32) @ b[sl].to(torch.float32)).to(torch.int32)
    return out


def conv2d_on_fp32_units(
    x: torch.Tensor,
    w_codes: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None,
    act: ActGrid,
    geometry: ConvGeometry,
) -> torch.Tensor | None:
    """An exact integer convolution computed by the float convolution, or None where it would not be exact.

    The activation codes minus the zero point (|c| <= 255) convolved with the weight codes give
    sums of at most ``in * kh * kw`` products; when that bound times the largest product stays
    below 2**24, every partial sum is an exact float32 integer. That holds for 4- and 2-bit
    weights on every layer of SD-class models (4 bits: up to 9,400 inputs per output), and lets
    packed layers skip im2col.

    Args:
        x: float (B, I, H, W).
        w_codes: int8 (O, I, kh, kw) codes.
        w_scale: float32 (O,).
        bias: float32 (O,) or None.
        act: the static activation grid.
        geometry: stride, padding, dilation, groups.
    """
    per_output = w_codes[0].numel()
    w_max = max(int(w_codes.abs().max()), 1) if w_codes.numel() else 1
    if per_output * (act.qmax - act.qmin) * w_max > _FP32_EXACT:
        return None
    # Zero padding of (codes - zero point) is exactly the padding of a real zero.
    codes = act.quantize(x, 0, torch.float32).sub_(act.zero_point)
    g = geometry
    acc = torch.nn.functional.conv2d(
        codes, w_codes.to(torch.float32), None, list(g.stride), list(g.padding), list(g.dilation), g.groups
    )
    out = acc * (act.scale * w_scale.to(torch.float32)).view(1, -1, 1, 1)
    return out if bias is None else out + bias.to(torch.float32).view(1, -1, 1, 1)


@register_backend("cpu")
class CpuBackend:
    """Exact int8 GEMMs on CPU: oneDNN with VNNI/AMX, otherwise exact int8 math on fp32 units.

    torch._int_mm is exact too but, without VNNI, a slow loop (measured ~40x slower than an fp32
    GEMM on a 2-core AVX2 machine), so it is not used there.
    """

    name = "cpu"

    def int_mm(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch._int_mm(a, b) if _cpu_has_vnni() else int_mm_on_fp32_units(a, b)

    def quant_matmul(self, x, w, scale, bias, pertoken_scale, output_dtype):
        acc = self.int_mm(x, w)
        if bias is not None:
            acc = acc + bias
        return _scaled(acc, scale, pertoken_scale, output_dtype)

    def dynamic_quant(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return dynamic_quant_per_token_reference(x)

    def packed_quant_matmul(self, x, w, scale, bias, pertoken_scale, output_dtype, zero_point):
        return unpacked_quant_matmul(self, x, w, scale, bias, pertoken_scale, output_dtype, zero_point)

    def packed_weight_only_matmul(self, x, w, scale, bias):
        return unpacked_weight_only_matmul(self, x, w, scale, bias)

    def weight_only_matmul(self, x, w, scale, bias, bits):
        # Dequantize inside the call (a transient float copy of one layer), then the float GEMM:
        # CPUs and GPUs have no faster exact path for float x int4 here; the resident copy stays packed.
        return weight_only_matmul_reference(x, w, scale, bias, torch.float32)

    def prepack_static_linear(self, w_q, w_scale, bias, act):
        # oneDNN's prepacked u8s8 GEMM is the fast integer path where it is exact. Elsewhere the
        # exact fallback runs int8 math on fp32 units (torch._int_mm is exact too but measured
        # ~40x slower than an fp32 GEMM on a 2-core AVX2 machine, see BENCHMARKS.md).
        if onednn_exact(w_q, act):
            return OneDnnStaticLinear(w_q, w_scale, bias, act)
        _warn_slow_fallback_once()
        return GenericStaticLinear(self, w_q, w_scale, bias, act)

    def prepack_static_conv(self, w_q, w_scale, bias, act, geometry):
        if onednn_exact(w_q, act):
            return OneDnnStaticConv(w_q, w_scale, bias, act, geometry)
        return None

    def static_conv_unpacked(self, x, w_codes, w_scale, bias, act, geometry):
        return conv2d_on_fp32_units(x, w_codes, w_scale, bias, act, geometry)


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

    def packed_quant_matmul(self, x, w, scale, bias, pertoken_scale, output_dtype, zero_point):
        # npu_quant_matmul's int4 form needs int4 activations too; with int8 activations the codes
        # are widened to int8 for this call (the resident copy stays packed).
        return unpacked_quant_matmul(self, x, w, scale, bias, pertoken_scale, output_dtype, zero_point)

    def packed_weight_only_matmul(self, x, w, scale, bias):
        # Unpacked for the call, then int4-packed for npu_weight_quant_batchmatmul (weight_only_matmul).
        return unpacked_weight_only_matmul(self, x, w, scale, bias)

    def weight_only_matmul(self, x, w, scale, bias, bits):
        # npu_weight_quant_batchmatmul dequantizes inside the cube kernel. It takes float16 or
        # bfloat16 x with a scale of the same dtype; 4-, 3- and 2-bit codes (all within int4) go in
        # as int32-packed int4 (npu_convert_weight_to_int4pack) when N allows, other codes as int8.
        dtype = x.dtype if x.dtype in (torch.float16, torch.bfloat16) else torch.float16
        int4 = bits <= 4 and w.shape[1] % 8 == 0  # the int4 pack holds eight values per int32 along N
        weight = self._npu.npu_convert_weight_to_int4pack(w.to(torch.int32)) if int4 else w
        out = self._npu.npu_weight_quant_batchmatmul(
            x.to(dtype), weight, scale.to(dtype), bias=None if bias is None else bias.to(torch.float32)
        )
        return out.to(torch.float32)

    def prepack_static_linear(self, w_q, w_scale, bias, act):
        return GenericStaticLinear(self, w_q, w_scale, bias, act)

    def prepack_static_conv(self, w_q, w_scale, bias, act, geometry):
        return None  # im2col + npu_quant_matmul

    def static_conv_unpacked(self, x, w_codes, w_scale, bias, act, geometry):
        return None  # im2col + npu_quant_matmul
