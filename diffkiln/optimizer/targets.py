"""Deployment targets: what a runtime other than diffkiln's can execute, as recipe settings.

A plan made for a target quantizes only what that runtime runs quantized, so the bundle (and the
report measured on it) is the model deployed there. ``mindiesd``: MindIE-SD's ``quantize`` swaps
``nn.Linear`` layers only, with int8 activation grids (static per tensor, per step, or dynamic per
token) and no BOS rows; its convolutions stay float. Its cache (``CacheConfig(method=
"dit_block_cache", ...)``) skips a residual block range on every step but each ``step_interval``-th
after ``step_start``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from diffkiln.core.errors import InvalidInputError
from diffkiln.optimizer.cache_search import CacheConfig
from diffkiln.optimizer.mixed_config import MixedConfig
from diffkiln.optimizer.w8a8 import W8A8Config

__all__ = ["TARGETS", "for_target"]


def _mindiesd(config: Any) -> Any:
    if isinstance(config, CacheConfig):
        # MindIE-SD's dit_block_cache: a residual block range, computing every k-th step after a start.
        return dataclasses.replace(config, mechanisms=("residual",), periodic=True, extrapolate=False)
    if isinstance(config, W8A8Config):
        if config.act_bits != 8:
            raise InvalidInputError("--target mindiesd runs int8 activation grids; drop --act-bits 7")
        if config.requantize_conv_outputs:
            raise InvalidInputError("--target mindiesd runs convolutions in float; drop --requantize-conv-outputs")
    elif not isinstance(config, MixedConfig):
        raise InvalidInputError(f"--target mindiesd has no settings for {type(config).__name__}")
    return dataclasses.replace(config, layer_kinds=("linear",), bos_aware=False, bos_positions=None)


TARGETS: dict[str, Callable[[Any], Any]] = {"mindiesd": _mindiesd}
"""Target name -> the function that turns a recipe config into that target's."""


def for_target(config: Any, target: str | None) -> Any:
    """``config`` with the settings ``target`` can execute (unchanged for None).

    Raises:
        InvalidInputError: an unknown target (the message lists the valid ones), or a setting the
            target cannot run.
    """
    if target is None:
        return config
    if target not in TARGETS:
        raise InvalidInputError(f"unknown target {target!r}; valid: {', '.join(sorted(TARGETS))}")
    return TARGETS[target](config)
