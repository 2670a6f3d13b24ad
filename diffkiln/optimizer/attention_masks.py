"""Block-mask candidates for one attention layer: the families that fit diffusion transformers.

Tokens lie on a :class:`TokenGrid`: ``prefix`` tokens (e.g. the text of a joint text-image
attention), then ``frames x height x width`` video or image tokens in (frame, row, column) order,
then ``suffix`` tokens. A block of ``block`` consecutive tokens covers a box of grid coordinates;
two blocks are *near* along an axis when the gap between their boxes is at most the window.

Families (each a ``(query_blocks, key_blocks)`` boolean mask):

* ``local``: a 3-D window over (frame, height, width), as STA tiles;
* ``spatial``: the same frame, any place;
* ``temporal``: the same place, any frame;
* ``topk``: each query block's largest calibrated mean attention masses;
* ``dense``.

Every family keeps the blocks that hold non-grid tokens (text), as queries and as keys, and a sink:
the first key block of the grid (the first frame's first tokens).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum

import torch

__all__ = ["MaskFamily", "TokenGrid", "block_boxes", "family_mask", "topk_mask"]

_ALL = 1 << 30
"""A window wider than any grid."""


class MaskFamily(str, Enum):
    """The block-mask families (see the module docstring)."""

    DENSE = "dense"
    LOCAL = "local"
    SPATIAL = "spatial"
    TEMPORAL = "temporal"
    TOPK = "topk"


@dataclass(frozen=True)
class TokenGrid:
    """Where an attention layer's tokens lie.

    Attributes:
        frames: frames of the grid (1 for an image).
        height: token rows per frame.
        width: token columns per frame.
        prefix: non-grid tokens before the grid (e.g. joint attention's text). Default 0.
        suffix: non-grid tokens after the grid. Default 0.
    """

    frames: int
    height: int
    width: int
    prefix: int = 0
    suffix: int = 0

    def __post_init__(self) -> None:
        if min(self.frames, self.height, self.width) <= 0 or min(self.prefix, self.suffix) < 0:
            raise ValueError(f"a token grid needs positive frames, height and width, got {self}")

    @property
    def tokens(self) -> int:
        """All tokens of the layer's sequence."""
        return self.prefix + self.frames * self.height * self.width + self.suffix

    def coords(self) -> torch.Tensor:
        """``(tokens, 3)`` (frame, row, column) of each token; -1 for non-grid tokens."""
        t, y, x = torch.meshgrid(torch.arange(self.frames), torch.arange(self.height), torch.arange(self.width),
                                 indexing="ij")  # fmt: skip
        grid = torch.stack([t, y, x], -1).reshape(-1, 3)
        return torch.cat([torch.full((self.prefix, 3), -1), grid, torch.full((self.suffix, 3), -1)])


def block_boxes(grid: TokenGrid, block: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per block of ``block`` tokens: the lowest and highest grid coordinate (each ``(blocks, 3)``)
    over its grid tokens, and whether it holds a non-grid token (``(blocks,)``)."""
    coords = grid.coords()
    blocks = math.ceil(grid.tokens / block)
    pad = blocks * block - grid.tokens
    c = torch.cat([coords, torch.full((pad, 3), -2)]).view(blocks, block, 3)
    on_grid = c[..., 0] >= 0
    big = torch.full_like(c, _ALL)
    low = torch.where(on_grid[..., None], c, big).amin(1)
    high = torch.where(on_grid[..., None], c, -big).amax(1)
    other = (c[..., 0] == -1).any(1)
    return low, high, other


def _always(grid: TokenGrid, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows kept dense, columns kept for every row): blocks with non-grid tokens, and the sink."""
    low, _, other = block_boxes(grid, block)
    cols = other.clone()
    grid_blocks = torch.nonzero(low[:, 0] < _ALL).flatten()
    if len(grid_blocks):
        cols[grid_blocks[0]] = True  # the sink: the first block of the grid
    return other, cols


def family_mask(
    grid: TokenGrid, block: int, family: MaskFamily, window: tuple[int, int, int] = (1, 2, 2)
) -> torch.Tensor:
    """The ``(blocks, blocks)`` mask of a geometric family.

    Args:
        grid: where the tokens lie.
        block: tokens per block.
        family: ``dense``, ``local``, ``spatial`` or ``temporal``.
        window: ``local`` only: the largest gap kept along (frame, row, column), in tokens.

    Raises:
        ValueError: ``topk`` (it needs the calibrated masses: :func:`topk_mask`), or a negative window.
    """
    if min(window) < 0:
        raise ValueError(f"window gaps must be >= 0, got {window}")
    low, high, _ = block_boxes(grid, block)
    n = low.shape[0]
    if family is MaskFamily.DENSE:
        mask = torch.ones(n, n, dtype=torch.bool)
    elif family is MaskFamily.TOPK:
        raise ValueError("the topk family is made from calibrated masses: use topk_mask")
    else:
        win = {MaskFamily.LOCAL: window, MaskFamily.SPATIAL: (0, _ALL, _ALL), MaskFamily.TEMPORAL: (_ALL, 0, 0)}[family]
        # Gap between the boxes of query block i and key block j along each axis (0 when they overlap).
        gap = (low[None, :, :] - high[:, None, :]).clamp_min(0) + (low[:, None, :] - high[None, :, :]).clamp_min(0)
        mask = (gap <= torch.tensor(win)).all(-1)
    rows, cols = _always(grid, block)
    mask[rows] = True
    mask[:, cols] = True
    return mask


def topk_mask(mass: torch.Tensor, grid: TokenGrid, block: int, density: float) -> torch.Tensor:
    """Each query block keeps its ``ceil(density * key_blocks)`` key blocks of largest calibrated
    mass (``mass``: ``(query_blocks, key_blocks)``), plus the always-kept rows and columns.

    Raises:
        ValueError: a density outside (0, 1], or a mass of another shape than the grid's blocks.
    """
    if not 0 < density <= 1:
        raise ValueError(f"density must be in (0, 1], got {density}")
    n = math.ceil(grid.tokens / block)
    if tuple(mass.shape) != (n, n):
        raise ValueError(f"the masses are {tuple(mass.shape)} blocks; this grid in blocks of {block} has ({n}, {n})")
    k = max(1, math.ceil(density * n))
    mask = torch.zeros(n, n, dtype=torch.bool)
    mask.scatter_(1, mass.topk(k, dim=1).indices, True)
    rows, cols = _always(grid, block)
    mask[rows] = True
    mask[:, cols] = True
    return mask
