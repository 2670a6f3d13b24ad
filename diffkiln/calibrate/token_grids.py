"""Where each attention layer's tokens lie, found from the data flow: which tokens are the latent
grid (and which are text), and the grid's (frames, height, width).

* **Grid tokens.** The model runs twice with the same conditioning and different initial noise.
  At an attention layer's first call, the query rows that change are the latent grid's tokens; the
  rows that stay are conditioning (the text of a joint text-image attention). They must form one
  contiguous run: the rows before it are the ``prefix``, after it the ``suffix``.
  Later layers mix text into the grid's rows, so the first layer with a sequence length gives the
  layout of every layer with that length.
* **Grid shape.** The last module output before the layer's first call shaped ``(batch, channels,
  frames, height, width)``, ``(batch, channels, height, width)`` or ``(batch * frames, channels,
  height, width)`` whose positions number the grid's tokens (a patch embedding's convolution, a
  UNet level's feature map) gives the shape. Without one (latents packed into tokens before the
  denoiser, as FLUX's are), the grid is one row of tokens, and only masks along that row make sense.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from diffkiln.core.attention import AttentionCall, attention_calls
from diffkiln.core.hooks import scoped_hooks

__all__ = ["find_token_grids"]


def _first_queries(denoiser: nn.Module, run: Callable[[], Any]) -> tuple[dict[str, torch.Tensor], dict[str, tuple]]:
    """Each attention layer's first query (batch row 0, ``(heads, tokens, dim)``), and its batch with
    the shapes of the 4-D and 5-D module outputs before it."""
    queries: dict[str, torch.Tensor] = {}
    grids: dict[str, tuple] = {}
    last: list[tuple[int, ...]] = []

    def on_output(_m: nn.Module, _a: Any, _k: Any, out: Any) -> None:
        if isinstance(out, torch.Tensor) and out.dim() in (4, 5):
            last.append(tuple(out.shape))

    def on_call(call: AttentionCall) -> None:
        if call.layer not in queries:
            queries[call.layer] = call.query[0].detach().float().clone()
            grids[call.layer] = (call.query.shape[0], tuple(last))

    with scoped_hooks() as hooks, torch.no_grad():
        for name, module in denoiser.named_modules():
            hooks.add_forward_hook(f"diffkiln.token_grids.{name or 'denoiser'}", module, on_output)
        with attention_calls(denoiser, on_call):
            run()
    return queries, grids


def _grid_run(changed: torch.Tensor) -> tuple[int, int] | None:
    """(start, length) of the one contiguous run of changed rows, or None."""
    idx = torch.nonzero(changed).flatten()
    if len(idx) == 0 or int(idx[-1] - idx[0]) + 1 != len(idx):
        return None
    return int(idx[0]), len(idx)


def find_token_grids(denoiser: nn.Module, run: Callable[[int], Any]) -> dict[str, Any]:
    """The :class:`~diffkiln.optimizer.attention_masks.TokenGrid` fields of every attention layer
    (see the module docstring), as ``{layer: {"frames", "height", "width", "prefix", "suffix"}}``.

    Args:
        denoiser: the denoiser.
        run: ``run(seed)`` calls the pipeline (or the denoiser) once with initial noise drawn from
            ``seed`` and everything else fixed.
    """
    first, shapes = _first_queries(denoiser, lambda: run(0))
    second, _ = _first_queries(denoiser, lambda: run(1))
    out: dict[str, Any] = {}
    by_length: dict[int, dict[str, int]] = {}
    for layer, q in first.items():
        tokens = q.shape[1]
        if tokens in by_length:  # later layers mix text and grid; the first with this length shows the layout
            out[layer] = dict(by_length[tokens])
            continue
        other = second.get(layer)
        changed = (
            (q - other).abs().amax(dim=(0, 2)) > 1e-6 * (1 + q.abs().amax())
            if other is not None and other.shape == q.shape
            else torch.ones(tokens, dtype=torch.bool)
        )
        start, length = _grid_run(changed) or (0, tokens)
        batch, outputs = shapes[layer]
        frames, height, width = _grid_shape(outputs, batch, length)
        out[layer] = by_length[tokens] = {"frames": frames, "height": height, "width": width, "prefix": start,
                                          "suffix": tokens - start - length}  # fmt: skip
    return out


def _grid_shape(outputs: tuple[tuple[int, ...], ...], batch: int, length: int) -> tuple[int, int, int]:
    """(frames, height, width) from the last module output laid out as ``(batch, channels, [frames,]
    height, width)``, or as ``(batch * frames, channels, height, width)`` (frames folded into the
    batch, as CogVideoX's patch embedding does), whose positions number ``length``; else a row."""
    for shape in reversed(outputs):
        if len(shape) == 5 and shape[2] * shape[3] * shape[4] == length:
            return shape[2], shape[3], shape[4]
        if len(shape) == 4 and shape[2] * shape[3] == length:
            return 1, shape[2], shape[3]
        frames = shape[0] // batch if len(shape) == 4 and batch and shape[0] % batch == 0 else 0
        if frames > 1 and frames * shape[2] * shape[3] == length:
            return frames, shape[2], shape[3]
    return 1, 1, length
