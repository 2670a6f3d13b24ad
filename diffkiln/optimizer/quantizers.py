"""Quantizer primitives: per-channel symmetric weights, per-tensor asymmetric activations.

Activation ranges come from calibration samples. The clipping range is chosen by minimising the
expected squared error over the samples (rounding noise inside the range plus clipping error
outside it) rather than by plain min/max, because a few outliers otherwise waste most of the
int8 grid on values that almost never occur.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

import torch

__all__ = [
    "ActQuantParams",
    "ClipMethod",
    "QuantizedWeight",
    "choose_act_params",
    "fake_quant_activation",
    "quantize_weight_per_channel",
]

INT8_MIN, INT8_MAX = -128, 127


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
    """

    q: torch.Tensor
    scale: torch.Tensor
    bits: int = 8

    def dequantize(self) -> torch.Tensor:
        """The float weight the integers represent."""
        shape = (-1,) + (1,) * (self.q.dim() - 1)
        return self.q.to(torch.float32) * self.scale.view(shape)


def quantize_weight_per_channel(weight: torch.Tensor, bits: int = 8) -> QuantizedWeight:
    """Symmetric per-output-channel quantisation (dim 0 is the output channel).

    Args:
        weight: a Linear (out, in) or Conv (out, in, kh, kw) weight.
        bits: 2..8. Default 8. The grid is symmetric, [-(2^(b-1) - 1), 2^(b-1) - 1].

    Raises:
        ValueError: bits outside 2..8.
    """
    if not 2 <= bits <= 8:
        raise ValueError(f"weight bits must be within 2..8, got {bits}")
    qmax = 2 ** (bits - 1) - 1
    w = weight.detach().to(torch.float32)
    absmax = w.reshape(w.shape[0], -1).abs().amax(dim=1)
    scale = torch.where(absmax > 0, absmax / qmax, torch.ones_like(absmax))
    shape = (-1,) + (1,) * (w.dim() - 1)
    q = torch.clamp(torch.round(w / scale.view(shape)), -qmax, qmax).to(torch.int8)
    return QuantizedWeight(q=q, scale=scale, bits=bits)


@dataclass(frozen=True)
class ActQuantParams:
    """Static per-tensor asymmetric int8 activation quantisation: ``q = clamp(round(x/scale) + zp)``.

    Attributes:
        scale: step size.
        zero_point: integer in [-128, 127] that represents 0.0.
        lo: the clipping range's lower end.
        hi: the clipping range's upper end.
    """

    scale: float
    zero_point: int
    lo: float
    hi: float


def _params_for_range(lo: float, hi: float) -> ActQuantParams:
    # The range must contain 0 so that zero (padding, ReLU/SiLU floors) is exact.
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    if hi - lo <= 0:
        return ActQuantParams(1.0, 0, 0.0, 0.0)
    scale = (hi - lo) / (INT8_MAX - INT8_MIN)
    zp = round(INT8_MIN - lo / scale)
    zp = max(INT8_MIN, min(INT8_MAX, zp))
    return ActQuantParams(scale, zp, lo, hi)


def fake_quant_activation(x: torch.Tensor, p: ActQuantParams) -> torch.Tensor:
    """Quantise then dequantise (simulated) with static params; used to score choices, not to run."""
    q = torch.clamp(torch.round(x / p.scale) + p.zero_point, INT8_MIN, INT8_MAX)
    return (q - p.zero_point) * p.scale


def choose_act_params(samples: torch.Tensor, method: ClipMethod = ClipMethod.MSE, grid: int = 40) -> ActQuantParams:
    """Choose static int8 params for an activation from calibration samples.

    Args:
        samples: a 1-D float tensor of observed activation values (a reservoir sample).
        method: MINMAX uses the observed range; MSE searches shrunken ranges (each end scaled
            independently by log-spaced factors from 1 down to 0.01) for the least squared error
            over the samples. Default MSE.
        grid: grid points per end for MSE. Default 60.

    Raises:
        ValueError: no samples.
    """
    x = samples.detach().to(torch.float32).flatten()
    if x.numel() == 0:
        raise ValueError("no activation samples to choose a range from; run calibration first")
    lo, hi = float(x.min()), float(x.max())
    best = _params_for_range(lo, hi)
    if method is ClipMethod.MINMAX:
        return best
    factors = torch.logspace(0, -2, grid)
    # Coordinate search, each sweep evaluated for all candidates at once: shrink the upper end
    # first, then the lower end given the chosen upper end. Factor 1 (min/max) is a candidate.
    hi_best = float(hi * factors[_argmin_mse(x, torch.full_like(factors, lo), hi * factors)])
    lo_best = float(lo * factors[_argmin_mse(x, lo * factors, torch.full_like(factors, hi_best))])
    return _params_for_range(lo_best, hi_best)


def _argmin_mse(x: torch.Tensor, los: torch.Tensor, his: torch.Tensor) -> int:
    """Index of the (lo, hi) candidate whose int8 fake quantization of ``x`` has the least MSE."""
    los, his = torch.clamp(los, max=0.0), torch.clamp(his, min=0.0)
    scale = torch.clamp((his - los) / (INT8_MAX - INT8_MIN), min=1e-12)[:, None]
    zp = torch.clamp(torch.round(INT8_MIN - los[:, None] / scale), INT8_MIN, INT8_MAX)
    q = torch.clamp(torch.round(x[None, :] / scale) + zp, INT8_MIN, INT8_MAX)
    err = ((q - zp) * scale - x[None, :]).pow(2).mean(dim=1)
    return int(torch.argmin(err))
