"""Translations of aten ops whose onnxscript (torchlib) translation is wrong on shapes that
diffusers denoisers give them; passed to ``torch.onnx.export`` beside the custom ops' ones.

``repeat_interleave.self_int`` with a symbolic ``repeats``: a video UNet repeats its text states
once per frame (``encoder_hidden_states.repeat_interleave(num_frames, dim=0)``), and a dynamic frame
axis makes ``num_frames`` symbolic. torchlib unsqueezes at ``dim + 1`` but builds the Expand shape
with the repeat count at ``dim``: ``[F, 1, 1, 1]`` against ``[B, 1, S, D]``. The graph is right only
where the batch equals the frame count (or is 1) and fails in onnxruntime at every other shape, so
such a denoiser lost its dynamic axes. This translation puts the count on the unsqueezed axis, as
torchlib already does for a constant ``repeats``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from onnxscript import opset20 as op

__all__ = ["ATEN_FIXES", "repeat_interleave_self_int"]


def _ints(values: list[int]) -> Any:
    return op.Constant(value_ints=values)


def repeat_interleave_self_int(self: Any, repeats: Any, dim: int | None = None, output_size: Any = None) -> Any:
    """``x.repeat_interleave(repeats, dim)`` for an int or symbolic ``repeats``: unsqueeze after
    ``dim``, expand that new axis to ``repeats``, fold it into ``dim``."""
    del output_size  # the result's shape follows from the Reshape
    if dim is None:
        self = op.Reshape(self, _ints([-1]))
        dim, rank = 0, 1
    else:
        rank = len(self.shape)
    axis = dim % rank
    count = _ints([repeats]) if isinstance(repeats, int) else op.Reshape(repeats, _ints([-1]))
    tiles = [_ints([1] * (axis + 1)), count] + ([_ints([1] * (rank - axis - 1))] if axis + 1 < rank else [])
    tiled = op.Expand(op.Unsqueeze(self, _ints([axis + 1])), op.Concat(*tiles, axis=0))
    shape = ([op.Shape(self, start=0, end=axis)] if axis else []) + [_ints([-1])]
    if axis + 1 < rank:
        shape.append(op.Shape(self, start=axis + 1))
    return op.Reshape(tiled, op.Concat(*shape, axis=0))


ATEN_FIXES: dict[Callable[..., Any], Callable[..., Any]] = {
    torch.ops.aten.repeat_interleave.self_int: repeat_interleave_self_int,
}
"""aten overload -> corrected onnxscript translation (``custom_translation_table`` entries)."""
