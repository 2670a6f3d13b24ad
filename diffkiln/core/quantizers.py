"""Quantizer primitives: per-channel (optionally two-level per-group) symmetric weights,
per-tensor asymmetric activations.

Activation ranges come from calibration samples. The clipping range is chosen by minimising the
expected squared error over the samples (rounding noise inside the range plus clipping error
outside it) rather than by plain min/max, because a few outliers otherwise waste most of the
int8 grid on values that almost never occur.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

import torch

from diffkiln.core.packing import GROUP_MULT_MAX, PACKABLE_BITS, apply_group_mult

__all__ = [
    "ActQuantParams",
    "ClipMethod",
    "QuantizedWeight",
    "act_code_range",
    "choose_act_params",
    "fake_quant_activation",
    "float16_scales_exact",
    "quantize_weight_grouped",
    "quantize_weight_per_channel",
]

INT8_MIN, INT8_MAX = -128, 127


def act_code_range(bits: int) -> tuple[int, int]:
    """(qmin, qmax) of an asymmetric activation grid of ``bits`` bits, as int8 codes.

    8 bits use all of int8, [-128, 127]; 7 bits use [-64, 63], which on x86 CPUs without VNNI
    keeps oneDNN's u8 x s8 pair sums inside int16 (see diffkiln.kernels.backends).

    Raises:
        ValueError: bits other than 7 or 8.
    """
    if bits not in (7, 8):
        raise ValueError(f"activation bits must be 7 or 8, got {bits}")
    return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1


class ClipMethod(str, Enum):
    """How an activation's clipping range is chosen from calibration samples."""

    MINMAX = "minmax"
    MSE = "mse"


@dataclass(frozen=True)
class QuantizedWeight:
    """A weight quantised per output channel, symmetric: ``w ~= q * scale[:, None, ...]``.

    Attributes:
        q: int8 tensor with the weight's shape.
        scale: float32 (out_channels,).
        bits: bit-width of the integer grid (8: values in [-127, 127]).
        group_mult: two-level grouped weights only (see :func:`quantize_weight_grouped`): uint8
            (out_channels, groups) integer multipliers of each group of ``group_size`` inputs;
            the weight is ``q * group_mult * scale``. Default None (per channel).
        group_size: inputs per group (along the flattened in * kh * kw axis). Default None.
    """

    q: torch.Tensor
    scale: torch.Tensor
    bits: int = 8
    group_mult: torch.Tensor | None = None
    group_size: int | None = None

    def int8_codes(self) -> torch.Tensor:
        """The int8 codes an 8-bit integer GEMM takes: ``q``, times the group multipliers if any."""
        if self.group_mult is None or self.group_size is None:
            return self.q
        return apply_group_mult(self.q.reshape(self.q.shape[0], -1), self.group_mult, self.group_size).reshape(
            self.q.shape
        )

    def dequantize(self) -> torch.Tensor:
        """The float weight the integers represent."""
        shape = (-1,) + (1,) * (self.q.dim() - 1)
        return self.int8_codes().to(torch.float32) * self.scale.view(shape)


_FP16_TINY = 2.0**-14  # the smallest normal float16: scales below it would lose precision
_FP16_MAX = 65504.0


def float16_scales_exact(weight: torch.Tensor, bits: int = 8) -> bool:
    """True when every per-channel scale of ``weight`` at ``bits`` lies in float16's normal range.

    Then storing the scales in float16 costs nothing but the rounding of each scale, against
    which the codes are computed (:func:`quantize_weight_per_channel`), so the stored layer is
    exact; outside that range float16 would clamp or lose precision, and float32 is kept.

    Args:
        weight: a Linear (out, in) or Conv (out, in, kh, kw) weight, as it will be quantized
            (smoothing factors applied).
        bits: 2..8. Default 8.
    """
    absmax = weight.detach().to(torch.float32).reshape(weight.shape[0], -1).abs().amax(dim=1)
    scale = absmax[absmax > 0] / (2 ** (bits - 1) - 1)
    return bool(((scale >= _FP16_TINY) & (scale <= _FP16_MAX)).all())


def quantize_weight_per_channel(
    weight: torch.Tensor, bits: int = 8, scale_dtype: torch.dtype = torch.float32
) -> QuantizedWeight:
    """Symmetric per-output-channel quantisation (dim 0 is the output channel).

    Args:
        weight: a Linear (out, in) or Conv (out, in, kh, kw) weight.
        bits: 2..8. Default 8. The grid is symmetric, [-(2^(b-1) - 1), 2^(b-1) - 1] (2 bits:
            {-1, 0, 1}).
        scale_dtype: the dtype the scales are stored in, float32 or float16. The codes are
            rounded against the stored scale, so storing it loses nothing further. Default float32.

    Raises:
        ValueError: bits outside 2..8, or another scale dtype.
    """
    if not 2 <= bits <= 8:
        raise ValueError(f"weight bits must be within 2..8, got {bits}")
    if scale_dtype not in (torch.float32, torch.float16):
        raise ValueError(f"scale_dtype must be float32 or float16, got {scale_dtype}")
    qmax = 2 ** (bits - 1) - 1
    w = weight.detach().to(torch.float32)
    absmax = w.reshape(w.shape[0], -1).abs().amax(dim=1)
    scale = torch.where(absmax > 0, absmax / qmax, torch.ones_like(absmax))
    if scale_dtype == torch.float16:
        scale = scale.clamp(_FP16_TINY, _FP16_MAX).to(torch.float16).to(torch.float32)
    shape = (-1,) + (1,) * (w.dim() - 1)
    q = torch.clamp(torch.round(w / scale.view(shape)), -qmax, qmax).to(torch.int8)
    return QuantizedWeight(q=q, scale=scale, bits=bits)


def quantize_weight_grouped(
    weight: torch.Tensor, bits: int, group_size: int, scale_dtype: torch.dtype = torch.float32
) -> QuantizedWeight:
    """Two-level symmetric quantization: a float scale per output channel, an integer multiplier
    per group of ``group_size`` inputs, ``bits``-bit codes (QServe's progressive scheme).

    Each group gets a step of ``scale * m`` with ``m`` in 1..15 (``GROUP_MULT_MAX``), so groups of small weights get a
    finer grid than per-channel quantization gives them, and ``q * m`` is an int8 code: the
    runtime unpacks to int8 and runs the same integer GEMM with per-channel scales, with no
    float group scales inside the kernel.

    Args:
        weight: a Linear (out, in) or Conv (out, in, kh, kw) weight.
        bits: 4, 3 or 2.
        group_size: inputs per group along the flattened input axis (a power of two >= 8).
        scale_dtype: float32 or float16, as :func:`quantize_weight_per_channel`. Default float32.

    Raises:
        ValueError: other bits, a bad group size, or another scale dtype.
    """
    if bits not in PACKABLE_BITS:
        raise ValueError(f"grouped weights are 4-, 3- or 2-bit, got {bits}")
    if group_size < 8 or group_size & (group_size - 1):
        raise ValueError(f"group size must be a power of two >= 8, got {group_size}")
    if scale_dtype not in (torch.float32, torch.float16):
        raise ValueError(f"scale_dtype must be float32 or float16, got {scale_dtype}")
    qmax = 2 ** (bits - 1) - 1
    w = weight.detach().to(torch.float32).reshape(weight.shape[0], -1)
    # The per-channel unit puts the largest weight at qmax * GROUP_MULT_MAX units (105 at 4 bits),
    # so the largest multiplier still covers it and q * m stays an int8 code.
    absmax = w.abs().amax(dim=1)
    scale = torch.where(absmax > 0, absmax / (qmax * GROUP_MULT_MAX), torch.ones_like(absmax))
    if scale_dtype == torch.float16:
        scale = scale.clamp(_FP16_TINY, _FP16_MAX).to(torch.float16).to(torch.float32)
    units = w / scale[:, None]
    n, k = units.shape
    groups = -(-k // group_size)
    padded = torch.nn.functional.pad(units.abs(), (0, groups * group_size - k)).reshape(n, groups, group_size)
    mult = torch.clamp(torch.ceil(padded.amax(dim=2) / qmax), 1, GROUP_MULT_MAX).to(torch.uint8)
    step = mult.to(torch.float32).repeat_interleave(group_size, dim=1)[:, :k]
    q = torch.clamp(torch.round(units / step), -qmax, qmax).to(torch.int8)
    return QuantizedWeight(q=q.reshape(weight.shape), scale=scale, bits=bits, group_mult=mult, group_size=group_size)


@dataclass(frozen=True)
class ActQuantParams:
    """Static per-tensor asymmetric activation quantisation: ``q = clamp(round(x/scale) + zp, qmin, qmax)``.

    Attributes:
        scale: step size.
        zero_point: integer in [qmin, qmax] that represents 0.0.
        lo: the clipping range's lower end.
        hi: the clipping range's upper end.
        bits: grid width, 8 ([-128, 127]) or 7 ([-64, 63]). Default 8.
    """

    scale: float
    zero_point: int
    lo: float
    hi: float
    bits: int = 8


def _params_for_range(lo: float, hi: float, bits: int = 8) -> ActQuantParams:
    # The range must contain 0 so that zero (padding, ReLU/SiLU floors) is exact.
    qmin, qmax = act_code_range(bits)
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    if hi - lo <= 0:
        return ActQuantParams(1.0, 0, 0.0, 0.0, bits)
    scale = (hi - lo) / (qmax - qmin)
    zp = round(qmin - lo / scale)
    zp = max(qmin, min(qmax, zp))
    return ActQuantParams(scale, zp, lo, hi, bits)


def fake_quant_activation(x: torch.Tensor, p: ActQuantParams) -> torch.Tensor:
    """Quantise then dequantise (simulated) with static params; used to score choices, not to run."""
    qmin, qmax = act_code_range(p.bits)
    q = torch.clamp(torch.round(x / p.scale) + p.zero_point, qmin, qmax)
    return (q - p.zero_point) * p.scale


def choose_act_params(
    samples: torch.Tensor, method: ClipMethod = ClipMethod.MSE, grid: int = 40, bits: int = 8
) -> ActQuantParams:
    """Choose static integer params for an activation from calibration samples.

    Args:
        samples: a 1-D float tensor of observed activation values (a reservoir sample).
        method: MINMAX uses the observed range; MSE searches shrunken ranges (each end scaled
            independently by log-spaced factors from 1 down to 0.01) for the least squared error
            over the samples. Default MSE.
        grid: grid points per end for MSE. Default 40.
        bits: activation grid, 8 or 7 (see :func:`act_code_range`). Default 8.

    Raises:
        ValueError: no samples, or bits other than 7 or 8.
    """
    x = samples.detach().to(torch.float32).flatten()
    if x.numel() == 0:
        raise ValueError("no activation samples to choose a range from; run calibration first")
    lo, hi = float(x.min()), float(x.max())
    best = _params_for_range(lo, hi, bits)
    if method is ClipMethod.MINMAX:
        return best
    factors = torch.logspace(0, -2, grid)
    # Coordinate search, each sweep evaluated for all candidates at once: shrink the upper end
    # first, then the lower end given the chosen upper end. Factor 1 (min/max) is a candidate.
    hi_best = float(hi * factors[_argmin_mse(x, torch.full_like(factors, lo), hi * factors, bits)])
    lo_best = float(lo * factors[_argmin_mse(x, lo * factors, torch.full_like(factors, hi_best), bits)])
    return _params_for_range(lo_best, hi_best, bits)


def _argmin_mse(x: torch.Tensor, los: torch.Tensor, his: torch.Tensor, bits: int) -> int:
    """Index of the (lo, hi) candidate whose fake quantization of ``x`` has the least MSE."""
    qmin, qmax = act_code_range(bits)
    los, his = torch.clamp(los, max=0.0), torch.clamp(his, min=0.0)
    scale = torch.clamp((his - los) / (qmax - qmin), min=1e-12)[:, None]
    zp = torch.clamp(torch.round(qmin - los[:, None] / scale), qmin, qmax)
    q = torch.clamp(torch.round(x[None, :] / scale) + zp, qmin, qmax)
    err = ((q - zp) * scale - x[None, :]).pow(2).mean(dim=1)
    return int(torch.argmin(err))
