"""Which denoiser layers shape the image's content, and which its quality (MixDQ's decoupling).

MixDQ observes that quantizing the text-image interaction layers changes *what* is drawn (it
shows in metrics of the final image against FP), while the rest changes *how well* it is drawn
(it shows in the denoiser output's noise). So sensitivity is measured with a different metric
per group. The groups come from module roles in the model's structure, never from layer names:

* content: layers inside a cross-attention (an attention module whose ``is_cross_attention`` is
  true, or whose ``added_kv_proj_dim`` is set: the joint text-image attention of SD3/FLUX-style
  blocks), and layers inside feed-forward modules of transformer blocks;
* quality: every other Linear/Conv2d.

Globs (``content``/``quality`` overrides) move single layers between the groups.
"""

from __future__ import annotations

import fnmatch
from enum import Enum

from torch import nn

from diffkiln.core.layers import find_quantizable_layers

__all__ = ["LayerRole", "layer_roles"]


class LayerRole(str, Enum):
    """A layer's sensitivity group."""

    CONTENT = "content"  # scored by SSIM of final images against FP
    QUALITY = "quality"  # scored by SQNR of the denoiser output against FP


def _is_cross_attention(module: nn.Module) -> bool:
    if "Attention" not in type(module).__name__:
        return False
    return bool(getattr(module, "is_cross_attention", False)) or getattr(module, "added_kv_proj_dim", None) is not None


def _is_feed_forward(module: nn.Module) -> bool:
    return "FeedForward" in type(module).__name__


def layer_roles(
    denoiser: nn.Module, content: tuple[str, ...] = (), quality: tuple[str, ...] = ()
) -> dict[str, LayerRole]:
    """The role of every Linear/Conv2d of ``denoiser``, in module order.

    Args:
        denoiser: a diffusers UNet or transformer.
        content: globs of layer names forced into the content group. Default none.
        quality: globs of layer names forced into the quality group (applied after ``content``).
            Default none.
    """
    modules = dict(denoiser.named_modules())
    roles: dict[str, LayerRole] = {}
    for name in find_quantizable_layers(denoiser):
        parts = name.split(".")
        ancestors = [modules[".".join(parts[:i])] for i in range(1, len(parts))]
        structural = any(_is_cross_attention(m) or _is_feed_forward(m) for m in ancestors)
        role = LayerRole.CONTENT if structural else LayerRole.QUALITY
        if any(fnmatch.fnmatchcase(name, g) for g in content):
            role = LayerRole.CONTENT
        if any(fnmatch.fnmatchcase(name, g) for g in quality):
            role = LayerRole.QUALITY
        roles[name] = role
    return roles
