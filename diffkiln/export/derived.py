"""Find the denoiser buffers a bundle need not store (see :mod:`diffkiln.core.derived`)."""

from __future__ import annotations

import torch
from torch import nn

from diffkiln.core.derived import ROUNDINGS, DerivedBuffer, derived_value, fingerprint, real_buffers_meta_params

__all__ = ["find_derived_buffers"]


def find_derived_buffers(denoiser: nn.Module) -> dict[str, DerivedBuffer]:
    """The buffers of ``denoiser`` that its class's constructor rebuilds from its config exactly.

    The denoiser is rebuilt from ``denoiser.config`` (a diffusers model) with real buffers and
    meta parameters; a buffer is derived when the rebuilt one equals it bit for bit as is or
    rounded to float16. Learned or edited buffers differ and stay stored.

    Args:
        denoiser: a diffusers ModelMixin (anything with a ``config`` and ``from_config``).

    Returns:
        Buffer name -> its record; empty for a model without a config.
    """
    config = getattr(denoiser, "config", None)
    from_config = getattr(type(denoiser), "from_config", None)
    if config is None or from_config is None:
        return {}
    with real_buffers_meta_params():
        rebuilt = from_config(config)
    fresh = dict(rebuilt.named_buffers())
    persistent = set(denoiser.state_dict())
    found: dict[str, DerivedBuffer] = {}
    for name, buf in denoiser.named_buffers():
        candidate = fresh.get(name)
        if candidate is None or candidate.is_meta or not buf.is_floating_point() or candidate.shape != buf.shape:
            continue
        for rounding in ROUNDINGS:
            if torch.equal(derived_value(candidate, rounding, buf.dtype), buf.detach().cpu()):
                found[name] = fingerprint(buf, rounding, name in persistent)
                break
    return found
