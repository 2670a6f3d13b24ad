"""CLIP-like BOS outliers on a pipeline, to measure BOS-aware quantization where it matters.

Real CLIP's last hidden state has a BOS row far larger than the other tokens' (reported at about
828 against 10-15 in the MixDQ write-up). A tiny CLIP trained on the shapes world does not grow one
(|BOS| 3.6 vs 3.8; shapes-dit's encoders have none), so the built-in shapes-unet's encoder
carries one by construction (|BOS| about 265 vs 5).
These helpers give a pipeline such an outlier, for benchmarks
(``tools/bench_bos.py``) and tests:

* :func:`bos_outlier` adds ``magnitude`` to two channels of the text encoder's BOS output row (or,
  with ``kind="row"``, multiplies the whole row) while inside its block, through a named, scoped
  forward hook;
* :func:`blind_cross_attention` zeroes those two input channels of every cross-attention to_k and
  to_v, so the FP model's output does not depend on the outlier (as an attention sink's value is
  near zero) and only a quantizer's activation range sees it;
* :func:`impose_bos_massive_activation` writes such an outlier into a CLIP text encoder's own
  weights (no hook), the way trained CLIP carries it: one residual channel that is large at the BOS
  position and zero at every other position, amplified by the final LayerNorm. The built-in
  shapes-unet is trained with it (``tools/train_shapes.py --bos-massive-activation``), so its
  folder loads in plain diffusers and still has CLIP's outlier.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from diffkiln.core.hooks import scoped_hooks

__all__ = [
    "OUTLIER_CHANNELS",
    "BosMassiveActivation",
    "blind_cross_attention",
    "bos_outlier",
    "impose_bos_massive_activation",
]

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


def blind_cross_attention(denoiser: nn.Module, channels: tuple[int, ...] = OUTLIER_CHANNELS) -> int:
    """Zero the to_k/to_v input columns of ``channels`` in every cross-attention (in place).

    Args:
        denoiser: a diffusers UNet or transformer whose cross-attentions set ``is_cross_attention``.
        channels: the text-embedding channels to zero. Default OUTLIER_CHANNELS.

    Returns:
        The number of cross-attentions changed.
    """
    n = 0
    with torch.no_grad():
        for module in denoiser.modules():
            if getattr(module, "is_cross_attention", False):
                for proj in (module.get_submodule("to_k"), module.get_submodule("to_v")):
                    weight = proj.get_parameter("weight")
                    weight[:, list(channels)] = 0.0
                n += 1
    return n


@dataclass(frozen=True)
class BosMassiveActivation:
    """Where and how large a CLIP-style BOS outlier is (see :func:`impose_bos_massive_activation`).

    Args:
        channel: the residual channel that carries it. Default 0.
        residual: its value in the residual stream at the BOS position (every other position holds
            0 there). Default 100.0: about 30x the other channels, so every LayerNorm of the BOS row
            is dominated by it, as in trained CLIP ("massive activations").
        gain: the final LayerNorm's weight on that channel (its bias there is 0). The BOS output
            is then at most ``gain * sqrt(hidden_size)`` in that channel (316 at width 64 with the
            default 40.0; 265 on the trained shapes-unet, whose BOS row keeps some energy in other
            channels), and another token's value there is ``-gain * mean / std`` of its own row
            (a few units). Default 40.0.

    Raises:
        ValueError: a negative channel, or a residual or gain that is not positive.
    """

    channel: int = 0
    residual: float = 100.0
    gain: float = 40.0

    def __post_init__(self) -> None:
        if self.channel < 0:
            raise ValueError(f"channel must be >= 0, got {self.channel}")
        if not self.residual > 0 or not self.gain > 0:
            raise ValueError(f"residual and gain must be positive, got {self.residual} and {self.gain}")


@torch.no_grad()
def impose_bos_massive_activation(text_encoder: nn.Module, spec: BosMassiveActivation) -> None:
    """Give a CLIP text encoder a BOS outlier in its weights, in place (idempotent).

    Trained CLIP keeps a huge value in a few residual channels at the BOS position only, and its
    final LayerNorm turns that into an output row hundreds of times larger than the others'. This
    sets exactly that structure, so that training (which calls it again after every optimizer step,
    a projection) keeps it:

    * the position embedding of position 0 (always BOS with CLIP's tokenizer) holds ``residual`` in
      ``channel``; every token embedding and every other position embedding holds 0 there;
    * no attention or MLP block writes to ``channel`` (their output rows and biases there are 0),
      so the residual stream is ``residual`` at BOS and 0 elsewhere in that channel;
    * the final LayerNorm has weight ``gain`` and bias 0 in ``channel``.

    Args:
        text_encoder: a transformers ``CLIPTextModel`` or ``CLIPTextModelWithProjection``.
        spec: where and how large.

    Raises:
        ValueError: ``spec.channel`` is not below the encoder's width, or the encoder is not
            CLIP-shaped (names the missing module).
    """
    try:
        embeddings = text_encoder.get_submodule("embeddings")
        layers = text_encoder.get_submodule("encoder.layers")
        final_norm = text_encoder.get_submodule("final_layer_norm")
    except AttributeError as err:
        raise ValueError(
            f"not a CLIP text encoder ({err}); expected embeddings, encoder.layers and final_layer_norm"
        ) from err
    token = embeddings.get_parameter("token_embedding.weight")
    position = embeddings.get_parameter("position_embedding.weight")
    c = spec.channel
    if c >= token.shape[1]:
        raise ValueError(f"channel {c} is outside the encoder's width {token.shape[1]}")
    token[:, c] = 0.0
    position[:, c] = 0.0
    position[0, c] = spec.residual
    for layer in layers.children():
        for name in ("self_attn.out_proj", "mlp.fc2"):
            proj = layer.get_submodule(name)
            proj.get_parameter("weight")[c, :] = 0.0
            proj.get_parameter("bias")[c] = 0.0
    final_norm.get_parameter("weight")[c] = spec.gain
    final_norm.get_parameter("bias")[c] = 0.0
