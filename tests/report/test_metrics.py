from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from diffkiln.core.metrics import content_accuracy, cosine_similarity, psnr_db, sqnr_db, ssim


def test_sqnr_known_value() -> None:
    ref = np.ones(100)
    # noise power 0.01 per element against signal power 1 -> 20 dB
    assert sqnr_db(ref, ref + 0.1) == pytest.approx(20.0)
    assert sqnr_db(torch.ones(4, 4), torch.ones(4, 4) * 0.99) == pytest.approx(40.0)
    assert sqnr_db(ref, ref) == math.inf


def test_psnr_known_value() -> None:
    a = np.zeros((8, 8))
    b = np.full((8, 8), 25.5)  # MSE = 25.5^2 -> PSNR = 20 log10(255 / 25.5) = 20 dB
    assert psnr_db(a, b) == pytest.approx(20.0)
    assert psnr_db(a, b / 255.0, data_range=1.0) == pytest.approx(20.0)
    assert psnr_db(a, a) == math.inf


def test_ssim_known_values() -> None:
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, size=(32, 32, 3)).astype(float)
    assert ssim(img, img) == pytest.approx(1.0)
    # Constant images: SSIM = (2ab + C1) / (a^2 + b^2 + C1) for the luminance term only.
    c1 = (0.01 * 255) ** 2
    a, b = np.full((16, 16), 100.0), np.full((16, 16), 50.0)
    assert ssim(a, b) == pytest.approx((2 * 100 * 50 + c1) / (100**2 + 50**2 + c1))
    # An inverted image is structurally anti-correlated.
    assert ssim(img, 255 - img) < 0.0


def test_cosine_known_values() -> None:
    assert cosine_similarity(np.array([1.0, 0.0]), np.array([0.0, 2.0])) == pytest.approx(0.0)
    assert cosine_similarity(np.array([1.0, 1.0]), np.array([2.0, 2.0])) == pytest.approx(1.0)
    assert cosine_similarity(np.array([1.0, 0.0]), np.array([1.0, 1.0])) == pytest.approx(1 / math.sqrt(2))
    with pytest.raises(ValueError, match="all-zero"):
        cosine_similarity(np.zeros(3), np.ones(3))


def test_content_accuracy_and_shape_checks() -> None:
    assert content_accuracy([True, False, True, True]) == 0.75
    with pytest.raises(ValueError, match="zero prompts"):
        content_accuracy([])
    with pytest.raises(ValueError, match="shapes differ"):
        sqnr_db(np.ones(3), np.ones(4))
    with pytest.raises(ValueError, match="H, W >= 11"):
        ssim(np.ones((5, 5)), np.ones((5, 5)))
