"""Integer Conv1d / Conv2d / Conv3d against the float convolution of the same integers."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import diffkiln.api as dk
from diffkiln.core.metrics import sqnr_db
from diffkiln.nn import QConv, QConv1d, QConv2d, QConv3d


class _One(nn.Module):
    def __init__(self, conv: nn.Module):
        super().__init__()
        self.conv = conv

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


CASES = {
    "conv1d-k3-pad1": (nn.Conv1d(16, 24, 3, padding=1), (2, 16, 20), QConv1d, F.conv1d),
    "conv1d-k4-stride2": (nn.Conv1d(16, 24, 4, stride=2), (2, 16, 21), QConv1d, F.conv1d),
    "conv2d-k3-pad1": (nn.Conv2d(8, 16, 3, padding=1), (2, 8, 10, 10), QConv2d, F.conv2d),
    "conv3d-patch": (nn.Conv3d(8, 16, (1, 2, 2), stride=(1, 2, 2)), (2, 8, 3, 8, 8), QConv3d, F.conv3d),
    "conv3d-k3-pad1": (nn.Conv3d(8, 16, 3, padding=1), (1, 8, 4, 6, 6), QConv3d, F.conv3d),
}


def _reference(q: QConv, x: torch.Tensor, conv_fn) -> torch.Tensor:
    """The same integers in float: the activation grid's codes, the dequantized weight, the bias."""
    grid = q.act_grid
    codes = torch.clamp(torch.round(x / grid.scale) + grid.zero_point, grid.qmin, grid.qmax)
    x_dq = (codes - grid.zero_point) * grid.scale
    w = q.codes_t().t().to(torch.float32).reshape(q.out_channels, q.in_channels, *q.weight_shape[2:])
    scale, bias = q.scale_and_bias()
    w = w * scale.view(-1, *([1] * (w.dim() - 1)))
    stride, padding = q.stride, q.padding
    if isinstance(q, QConv1d):  # QConv1d keeps a height-1 2-D geometry
        stride, padding = stride[1:], padding[1:]
    return conv_fn(x_dq, w, bias, stride, padding)


@pytest.mark.parametrize("weight_bits", [8, 7])
@pytest.mark.parametrize("case", sorted(CASES))
def test_integer_convolution_matches_its_float_reference(case: str, weight_bits: int) -> None:
    torch.manual_seed(0)
    conv, shape, q_type, conv_fn = CASES[case]
    model = _One(copy.deepcopy(conv)).eval()
    inputs = [{"x": torch.randn(shape)} for _ in range(3)]
    stats = dk.calibrate(model, inputs=inputs)
    # A lone convolution reads the input and writes the output: include it, or it stays float.
    plan = dk.make_plan(model, stats, dk.W8A8Config(include=("conv",), weight_bits=weight_bits))
    q = dk.quantize_(copy.deepcopy(model), plan, stats)
    assert type(q.conv) is q_type and q.conv.codes_t().dtype == torch.int8
    x = torch.randn(shape)
    with torch.no_grad():
        got, ref, fp = q(x), _reference(q.conv, x, conv_fn), model(x)
    assert got.shape == fp.shape
    # Integer sums against float sums of the same integers: float rounding only (measured 135-139
    # dB; a wrong patch order or padding gives under 10 dB).
    assert sqnr_db(ref, got) >= 100.0
    # Against the float layer: 8- or 7-bit weights and 8-bit activations (measured 36-41 dB).
    assert sqnr_db(fp, got) >= 33.0
