"""The CPU backend: oneDNN's prepacked u8s8 kernels where they are exact, exact int8 math on float32 units elsewhere."""

from __future__ import annotations

import functools
import warnings

import torch

from diffkiln.kernels.backends.base import (
    ActGrid,
    ConvGeometry,
    GenericStaticLinear,
    SlowKernelWarning,
    register_backend,
    scaled,
    unpacked_quant_matmul,
    unpacked_weight_only_matmul,
)
from diffkiln.kernels.reference import dynamic_quant_per_token_reference, weight_only_matmul_reference

__all__ = [
    "CpuBackend",
    "OneDnnStaticConv",
    "OneDnnStaticLinear",
    "conv2d_on_fp32_units",
    "cpu_has_vnni",
    "int_mm_on_fp32_units",
    "onednn_available",
    "onednn_exact",
]


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
def cpu_has_vnni() -> bool:
    """True when the CPU has an int8 dot-product unit (AVX512-VNNI, AVX-VNNI or AMX)."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="ignore") as f:
            flags = set(f.read().split())
    except OSError:
        return False
    return bool(flags & {"avx512_vnni", "avx512vnni", "avx_vnni", "amx_int8"})


def onednn_available() -> bool:
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
    if not onednn_available():
        return False
    if cpu_has_vnni():
        return True
    return act.bits <= 7 or int(w_q.abs().max()) <= 64


@functools.cache
def _warn_slow_fallback_once() -> None:
    if onednn_available() and not cpu_has_vnni():
        warnings.warn(
            "this CPU has no int8 dot-product unit (AVX2 without VNNI), so oneDNN's fast int8 kernels "
            "are exact only on a 7-bit grid; this bundle's 8-bit layers use the exact fallback, which "
            "is slower than FP32. Rebuild with `diffkiln optimize ... --act-bits 7` for the fast path "
            "(see docs/plan-format.md).",
            SlowKernelWarning,
            stacklevel=3,
        )


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
        return torch._int_mm(a, b) if cpu_has_vnni() else int_mm_on_fp32_units(a, b)

    def quant_matmul(self, x, w, scale, bias, pertoken_scale, output_dtype):
        acc = self.int_mm(x, w)
        if bias is not None:
            acc = acc + bias
        return scaled(acc, scale, pertoken_scale, output_dtype)

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
