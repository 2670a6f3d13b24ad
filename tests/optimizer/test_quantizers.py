from __future__ import annotations

import pytest
import torch

from diffkiln.core.metrics import sqnr_db
from diffkiln.core.quantizers import (
    ClipMethod,
    choose_act_params,
    fake_quant_activation,
    float16_scales_exact,
    quantize_weight_per_channel,
)


@pytest.mark.parametrize("shape", [(64, 32), (16, 8, 3, 3)], ids=["linear", "conv"])
def test_weight_per_channel_int8_sqnr_and_exact_grid(shape: tuple[int, ...]) -> None:
    w = torch.randn(shape) * torch.logspace(-2, 0, shape[0]).view(-1, *([1] * (len(shape) - 1)))
    qw = quantize_weight_per_channel(w)
    assert qw.q.dtype == torch.int8 and qw.q.shape == w.shape and qw.scale.shape == (shape[0],)
    assert int(qw.q.abs().max()) == 127  # every channel uses its full grid
    assert sqnr_db(w, qw.dequantize()) >= 38.0
    # Quantising the dequantised weight again is a fixed point (bit-exact).
    again = quantize_weight_per_channel(qw.dequantize())
    assert torch.equal(again.q, qw.q)


@pytest.mark.parametrize(
    ("absmax", "exact"),
    [(1.0, True), (127 * 2.0**-14, True), (127 * 2.0**-15, False), (127 * 70000.0, False)],
    ids=["typical", "smallest-normal", "subnormal", "overflow"],
)
def test_float16_scales_exact_only_inside_the_normal_range(absmax: float, exact: bool) -> None:
    w = torch.randn(8, 16)
    w = w / w.abs().amax(dim=1, keepdim=True) * torch.tensor([1.0] * 7 + [absmax])[:, None]
    assert float16_scales_exact(w) is exact
    if exact:  # storing float16 scales then loses nothing: the codes are computed against them
        half = quantize_weight_per_channel(w, scale_dtype=torch.float16)
        assert torch.equal(half.scale, half.scale.half().float())
        assert sqnr_db(w, half.dequantize()) >= sqnr_db(w, quantize_weight_per_channel(w).dequantize()) - 0.05


def test_weight_bits_are_validated() -> None:
    with pytest.raises(ValueError, match=r"2\.\.8"):
        quantize_weight_per_channel(torch.ones(2, 2), bits=9)


@pytest.mark.parametrize(
    ("dist", "min_sqnr"),
    [
        (torch.distributions.Normal(0.0, 1.0), 30.0),
        (torch.distributions.Laplace(0.0, 1.0), 30.0),
        (torch.distributions.StudentT(2.0), 20.0),  # extreme tail: one value sets the range
    ],
    ids=["normal", "laplace", "student-t2"],
)
def test_mse_clipping_is_never_worse_than_minmax(dist, min_sqnr: float) -> None:
    torch.manual_seed(0)
    x = torch.nn.functional.silu(dist.sample((20000,)) * 3)
    mm = choose_act_params(x, ClipMethod.MINMAX)
    mse = choose_act_params(x, ClipMethod.MSE)
    assert (mm.lo, mm.hi) == (pytest.approx(min(float(x.min()), 0.0)), pytest.approx(float(x.max())))
    err = lambda p: float(((fake_quant_activation(x, p) - x) ** 2).mean())  # noqa: E731
    assert err(mse) <= err(mm)
    assert sqnr_db(x, fake_quant_activation(x, mse)) >= min_sqnr


def test_act_params_keep_zero_exact_and_reject_empty() -> None:
    p = choose_act_params(torch.linspace(0.5, 3.0, 100), ClipMethod.MINMAX)
    assert p.lo == 0.0 and float(fake_quant_activation(torch.zeros(1), p)) == 0.0
    with pytest.raises(ValueError, match="no activation samples"):
        choose_act_params(torch.empty(0))
