"""SmoothQuant smoothing: the float product is unchanged, and it helps where channels are outliers."""

from __future__ import annotations

import pytest
import torch

from diffkiln.core.metrics import sqnr_db
from diffkiln.core.quantizers import (
    ActQuantParams,
    choose_act_params,
    fake_quant_activation,
    quantize_weight_per_channel,
)
from diffkiln.core.smoothing import channel_outlier_ratio, smoothing_factors


def _outlier_input(tokens: int = 512, channels: int = 64, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, channels, generator=g)
    x[:, :3] *= 25.0  # three outlier channels, as in a GEGLU output
    return x


def test_smoothing_leaves_the_float_product_unchanged() -> None:
    x = _outlier_input()
    w = torch.randn(32, 64, generator=torch.Generator().manual_seed(1))
    s = smoothing_factors(x.abs().amax(0), w, 0.5)
    assert s.shape == (64,) and bool((s > 0).all())
    torch.testing.assert_close((x / s) @ (w * s).T, x @ w.T, rtol=1e-4, atol=1e-4)


def test_smoothing_raises_w8a8_sqnr_on_outlier_channels() -> None:
    x = _outlier_input()
    w = torch.randn(32, 64, generator=torch.Generator().manual_seed(1)) * 0.1
    ref = x @ w.T

    def w8a8(x_in: torch.Tensor, w_in: torch.Tensor) -> torch.Tensor:
        p: ActQuantParams = choose_act_params(x_in.flatten())
        return fake_quant_activation(x_in, p) @ quantize_weight_per_channel(w_in).dequantize().T

    s = smoothing_factors(x.abs().amax(0), w, 0.5)
    plain, smoothed = sqnr_db(ref, w8a8(x, w)), sqnr_db(ref, w8a8(x / s, w * s))
    assert channel_outlier_ratio(x.abs().amax(0)) > 8.0
    assert smoothed >= plain + 6.0, (plain, smoothed)


@pytest.mark.parametrize("alpha", [0.0, 1.0, -0.5])
def test_alpha_outside_the_open_unit_interval_is_refused(alpha: float) -> None:
    with pytest.raises(ValueError, match="alpha"):
        smoothing_factors(torch.ones(4), torch.ones(2, 4), alpha)


def test_mismatched_shapes_are_refused() -> None:
    with pytest.raises(ValueError, match=r"\(in,\)"):
        smoothing_factors(torch.ones(5), torch.ones(2, 4), 0.5)
