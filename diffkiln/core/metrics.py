"""Fidelity and quality metrics: SQNR, PSNR, SSIM, cosine similarity, content accuracy.

All take numpy arrays or torch tensors and return Python floats. Conventions:
* ``sqnr_db(ref, test) = 10 log10(sum ref^2 / sum (ref - test)^2)`` (MixDQ's definition);
* ``psnr_db`` uses a given data range (255 for uint8 images, 1.0 for [0, 1] floats);
* ``ssim`` is Wang et al. (2004) with an 11x11 Gaussian window (sigma 1.5), K1=0.01, K2=0.03,
  averaged over channels and pixels.
Identical inputs give ``inf`` for SQNR and PSNR.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

__all__ = ["content_accuracy", "cosine_similarity", "psnr_db", "sqnr_db", "ssim"]

ArrayLike = np.ndarray | torch.Tensor


def _np(x: ArrayLike) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().to("cpu", torch.float64).numpy()
    return np.asarray(x, dtype=np.float64)


def _same_shape(ref: np.ndarray, test: np.ndarray) -> None:
    if ref.shape != test.shape:
        raise ValueError(f"shapes differ: reference {ref.shape} vs test {test.shape}")


def sqnr_db(reference: ArrayLike, test: ArrayLike) -> float:
    """Signal-to-quantization-noise ratio in dB: ``10 log10(sum ref^2 / sum (ref - test)^2)``.

    Args:
        reference: the full-precision signal.
        test: the approximation, same shape.
    """
    ref, tst = _np(reference), _np(test)
    _same_shape(ref, tst)
    noise = float(((ref - tst) ** 2).sum())
    signal = float((ref**2).sum())
    if noise == 0.0:
        return math.inf
    if signal == 0.0:
        return -math.inf
    return 10.0 * math.log10(signal / noise)


def psnr_db(reference: ArrayLike, test: ArrayLike, data_range: float = 255.0) -> float:
    """Peak signal-to-noise ratio in dB: ``10 log10(range^2 / MSE)``.

    Args:
        reference: the reference image(s).
        test: the compared image(s), same shape.
        data_range: max minus min of the value range. Default 255 (uint8 images).
    """
    if data_range <= 0:
        raise ValueError(f"data_range must be positive, got {data_range}")
    ref, tst = _np(reference), _np(test)
    _same_shape(ref, tst)
    mse = float(((ref - tst) ** 2).mean())
    return math.inf if mse == 0.0 else 10.0 * math.log10(data_range**2 / mse)


def _gaussian_window(size: int = 11, sigma: float = 1.5) -> np.ndarray:
    ax = np.arange(size) - (size - 1) / 2.0
    g = np.exp(-(ax**2) / (2 * sigma**2))
    g /= g.sum()
    return np.outer(g, g)


def _filter2d(img: np.ndarray, win: np.ndarray) -> np.ndarray:
    """'valid' 2-D correlation of an (H, W) image with a small window."""
    k = win.shape[0]
    h, w = img.shape
    out = np.zeros((h - k + 1, w - k + 1))
    for dy in range(k):
        for dx in range(k):
            out += win[dy, dx] * img[dy : dy + h - k + 1, dx : dx + w - k + 1]
    return out


def ssim(reference: ArrayLike, test: ArrayLike, data_range: float = 255.0) -> float:
    """Structural similarity (Wang et al. 2004), mean over pixels and channels.

    Args:
        reference: (H, W) or (H, W, C) image; H and W at least 11.
        test: the compared image, same shape.
        data_range: max minus min of the value range. Default 255 (uint8 images).
    """
    ref, tst = _np(reference), _np(test)
    _same_shape(ref, tst)
    if ref.ndim == 2:
        ref, tst = ref[..., None], tst[..., None]
    if ref.ndim != 3 or min(ref.shape[:2]) < 11:
        raise ValueError(f"ssim needs (H, W) or (H, W, C) images with H, W >= 11, got {ref.shape}")
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    win = _gaussian_window()
    vals = []
    for c in range(ref.shape[2]):
        x, y = ref[..., c], tst[..., c]
        mx, my = _filter2d(x, win), _filter2d(y, win)
        sxx = _filter2d(x * x, win) - mx**2
        syy = _filter2d(y * y, win) - my**2
        sxy = _filter2d(x * y, win) - mx * my
        s = ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx**2 + my**2 + c1) * (sxx + syy + c2))
        vals.append(s.mean())
    return float(np.mean(vals))


def cosine_similarity(reference: ArrayLike, test: ArrayLike) -> float:
    """Cosine of the angle between the two tensors, flattened.

    Args:
        reference: first tensor.
        test: second tensor, same shape.
    """
    ref, tst = _np(reference).ravel(), _np(test).ravel()
    _same_shape(ref, tst)
    denom = float(np.linalg.norm(ref) * np.linalg.norm(tst))
    if denom == 0.0:
        raise ValueError("cosine similarity is undefined for an all-zero tensor")
    return float(ref @ tst) / denom


def content_accuracy(correct: Sequence[bool]) -> float:
    """Fraction of prompts whose image the judge found entirely correct.

    Args:
        correct: one judge decision per prompt.
    """
    if len(correct) == 0:
        raise ValueError("content accuracy of zero prompts is undefined; judge at least one image")
    return sum(bool(c) for c in correct) / len(correct)
