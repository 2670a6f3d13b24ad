"""SmoothQuant-style per-input-channel smoothing of a Linear layer (Xiao et al., 2023).

A few input channels of some layers carry most of the activation range (in diffusion UNets,
the GEGLU output read by ``ff.net.2``: measured on shapes-unet, the top channel reaches 22.6 while
the median channel stays at 1.6). A per-tensor int8 grid then spends almost all its levels on
those channels. Smoothing divides each activation channel j by ``s_j`` and multiplies the
weight's column j by it, which leaves the float product unchanged:

    y = x W^T = (x / s) (W * s)^T,   s_j = max|x_j|^alpha / max|W[:, j]|^(1 - alpha)

so activations and weights share the range. At run time the quantized layer multiplies its input
by ``1 / s`` before quantizing it (msModelSlim stores the same vector as ``div.mul_scale``).
"""

from __future__ import annotations

import torch

__all__ = ["channel_outlier_ratio", "smoothing_factors"]

_EPS = 1e-5


def smoothing_factors(act_channel_absmax: torch.Tensor, weight: torch.Tensor, alpha: float) -> torch.Tensor:
    """Per-input-channel factors ``s`` (float32, (in_features,)).

    Args:
        act_channel_absmax: (in_features,) largest |activation| per input channel (calibration).
        weight: the Linear's (out_features, in_features) float weight.
        alpha: migration strength in (0, 1): 0 leaves activations as they are, 1 moves their whole
            range into the weights.

    Raises:
        ValueError: alpha outside (0, 1), or shapes that disagree.
    """
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"smoothing alpha must be in (0, 1), got {alpha}")
    if weight.dim() != 2 or act_channel_absmax.shape != (weight.shape[1],):
        raise ValueError(
            f"need a (out, in) weight and (in,) activation maxima, got {tuple(weight.shape)} "
            f"and {tuple(act_channel_absmax.shape)}"
        )
    a = act_channel_absmax.detach().float().clamp(min=_EPS)
    w = weight.detach().float().abs().amax(dim=0).clamp(min=_EPS)
    return (a.pow(alpha) / w.pow(1.0 - alpha)).clamp(min=_EPS)


def channel_outlier_ratio(act_channel_absmax: torch.Tensor) -> float:
    """Largest channel maximum over the median channel maximum (1.0: no outlier channel).

    Args:
        act_channel_absmax: (channels,) largest |activation| per channel.
    """
    a = act_channel_absmax.detach().float()
    median = float(a.median())
    return float(a.max()) / median if median > 0 else float("inf")
