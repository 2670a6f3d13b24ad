"""Translations of aten ops whose onnxscript (torchlib) translation is wrong on shapes that
diffusers denoisers give them; passed to ``torch.onnx.export`` beside the custom ops' ones.

``repeat_interleave.self_int`` with a symbolic ``repeats``: a video UNet repeats its text states
once per frame (``encoder_hidden_states.repeat_interleave(num_frames, dim=0)``), and a dynamic frame
axis makes ``num_frames`` symbolic. torchlib unsqueezes at ``dim + 1`` but builds the Expand shape
with the repeat count at ``dim``: ``[F, 1, 1, 1]`` against ``[B, 1, S, D]``. The graph is right only
where the batch equals the frame count (or is 1) and fails in onnxruntime at every other shape, so
such a denoiser lost its dynamic axes. This translation puts the count on the unsqueezed axis, as
torchlib already does for a constant ``repeats``.

``squeeze.dim`` and ``squeeze.dims`` on an axis that is not statically 1: torch squeezes an axis
only where its size is 1, and torch.export traces a dynamic axis as never 1 (its 0/1
specialization), so ``x.squeeze(1)`` on a symbolic token axis is a no-op in the program. torchlib
emits an ONNX ``Squeeze`` there, which onnxruntime refuses for any size but 1: PixArt's output
projection (``hidden_states.squeeze(1)``) failed at every token count. This translation squeezes
the axes whose size is 1 in the traced program and passes the others through.

``copy`` with a ``src`` that broadcasts: ``dst.copy_(src)`` fills ``dst`` with ``src`` broadcast to
``dst``'s shape, and functionalization turns it into ``aten.copy(dst, src)``, whose result has
``dst``'s shape. torchlib translates it as ``CastLike(src, dst)``, which keeps ``src``'s shape: a
rank-2 table copied into a rank-3 slice (CogVideoX's position table, rebuilt at a size other than
the configured one) gave a graph that fails ONNX shape inference. This translation expands the
cast ``src`` to ``dst``'s shape where the traced shapes differ.

``where.self`` and ``masked_fill`` on boolean tensors: torchlib emits ONNX ``Where`` on bool values,
which onnxruntime's CPU provider has no kernel for (``NOT_IMPLEMENTED: Could not find an
implementation for Where``): HunyuanVideo's attention mask (``mask.masked_fill(indices, False)``)
gave a denoiser graph that onnxruntime cannot load. These translations compute a boolean choice
with logic ops, ``(c and x) or (not c and y)``, and leave every other type to ``Where``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import onnx_ir as ir
import torch
from onnxscript import opset20 as op

__all__ = [
    "ATEN_FIXES",
    "copy_default",
    "masked_fill",
    "repeat_interleave_self_int",
    "squeeze_dim",
    "squeeze_dims",
    "where_self",
]


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


def squeeze_dims(self: Any, dim: list[int]) -> Any:
    """``x.squeeze(dims)`` as the traced program computes it: only the axes of size 1 go."""
    if self.shape is None:  # no traced shape: torchlib's translation
        return op.Squeeze(self, _ints(list(dim)))
    rank = len(self.shape)
    axes = [d % rank for d in dim if rank and self.shape[d % rank] == 1]
    return op.Squeeze(self, _ints(axes)) if axes else op.Identity(self)


def squeeze_dim(self: Any, dim: int) -> Any:
    """``x.squeeze(dim)``: :func:`squeeze_dims` of one axis."""
    return squeeze_dims(self, [dim])


def copy_default(self: Any, src: Any, non_blocking: bool = False) -> Any:
    """``aten.copy(dst, src)``: ``src`` cast to ``dst``'s type and broadcast to its shape."""
    del non_blocking  # no meaning in a graph
    cast = op.CastLike(src, self)
    if self.shape is not None and src.shape is not None and list(self.shape) == list(src.shape):
        return cast
    return op.Expand(cast, op.Shape(self))


def _choose(condition: Any, chosen: Any, other: Any) -> Any:
    """``Where(condition, chosen, other)``; for boolean values with logic ops (onnxruntime has no
    boolean ``Where``)."""
    if other.dtype == ir.DataType.BOOL:
        return op.Or(op.And(condition, chosen), op.And(op.Not(condition), other))
    return op.Where(condition, chosen, other)


def where_self(condition: Any, self: Any, other: Any) -> Any:
    """``torch.where(condition, self, other)`` (the exporter has promoted both to one type)."""
    return _choose(condition, op.CastLike(self, other), other)


def masked_fill(self: Any, mask: Any, value: Any) -> Any:
    """``self.masked_fill(mask, value)``: ``value`` where ``mask``, else ``self``."""
    return _choose(mask, op.CastLike(value, self), self)


ATEN_FIXES: dict[Callable[..., Any], Callable[..., Any]] = {
    torch.ops.aten.copy.default: copy_default,
    torch.ops.aten.repeat_interleave.self_int: repeat_interleave_self_int,
    torch.ops.aten.squeeze.dim: squeeze_dim,
    torch.ops.aten.squeeze.dims: squeeze_dims,
    torch.ops.aten.where.self: where_self,
    torch.ops.aten.masked_fill.Scalar: masked_fill,
    torch.ops.aten.masked_fill.Tensor: masked_fill,
}
"""aten overload -> corrected onnxscript translation (``custom_translation_table`` entries)."""
