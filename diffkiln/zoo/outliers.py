"""CLIP-like BOS outliers on a pipeline, to measure BOS-aware quantization where it matters.

Real CLIP's last hidden state has a BOS row far larger than the other tokens' (reported at about
828 against 10-15 in the MixDQ write-up); the built-in models' tiny CLIPs have none (|BOS| 3.6 vs
3.8 on shapes-unet). These helpers give a pipeline such an outlier, for benchmarks
(``tools/bench_bos.py``) and tests:

* :func:`bos_outlier` adds ``magnitude`` to two channels of the text encoder's BOS output row (or,
  with ``kind="row"``, multiplies the whole row) while inside its block, through a named, scoped
  forward hook;
* :func:`blind_cross_attention` zeroes those two input channels of every cross-attention to_k and
  to_v, so the FP model's output does not depend on the outlier (as an attention sink's value is
  near zero) and only a quantizer's activation range sees it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from diffkiln.calibrate.hooks import scoped_hooks

__all__ = ["OUTLIER_CHANNELS", "blind_cross_attention", "bos_outlier"]

OUTLIER_CHANNELS = (0, 1)
"""The text-embedding channels that carry the channel outlier."""


@contextlib.contextmanager
def bos_outlier(pipe: Any, magnitude: float, kind: str = "channel") -> Iterator[None]:
    """Give the BOS row (position 0) of ``pipe.text_encoder``'s last hidden state an outlier inside the block.

    Args:
        pipe: a pipeline with a CLIP-style ``text_encoder`` (output with ``last_hidden_state``).
        magnitude: ``channel``: added to OUTLIER_CHANNELS of the BOS row (0: no hook);
            ``row``: the BOS row's multiplier (1: no hook).
        kind: "channel" or "row". Default "channel".

    Raises:
        ValueError: another kind.
    """
    if kind not in ("channel", "row"):
        raise ValueError(f"outlier kind must be 'channel' or 'row', got {kind!r}")

    def hook(_module: nn.Module, _args: Any, _kwargs: Any, output: Any) -> Any:
        hidden = output.last_hidden_state.clone()
        if kind == "row":
            hidden[:, 0] = hidden[:, 0] * magnitude
        else:
            hidden[:, 0, list(OUTLIER_CHANNELS)] += magnitude
        output.last_hidden_state = hidden
        return output

    with scoped_hooks() as hooks:
        if magnitude != (1.0 if kind == "row" else 0.0):
            hooks.add_forward_hook("zoo.bos_outlier", pipe.text_encoder, hook)
        yield


def blind_cross_attention(denoiser: nn.Module) -> int:
    """Zero the to_k/to_v input columns of OUTLIER_CHANNELS in every cross-attention (in place).

    Args:
        denoiser: a diffusers UNet or transformer whose cross-attentions set ``is_cross_attention``.

    Returns:
        The number of cross-attentions changed.
    """
    n = 0
    with torch.no_grad():
        for module in denoiser.modules():
            if getattr(module, "is_cross_attention", False):
                for proj in (module.get_submodule("to_k"), module.get_submodule("to_v")):
                    weight = proj.get_parameter("weight")
                    weight[:, list(OUTLIER_CHANNELS)] = 0.0
                n += 1
    return n
