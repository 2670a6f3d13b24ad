"""Block-mask families on token grids: windows by brute force over token coordinates, text and sink
always kept, top-k from calibrated masses."""

from __future__ import annotations

import pytest
import torch

from diffkiln.optimizer.attention_masks import MaskFamily, TokenGrid, block_boxes, family_mask, topk_mask


def _brute_local(grid: TokenGrid, block: int, window: tuple[int, int, int]) -> torch.Tensor:
    coords = grid.coords()
    n = -(-grid.tokens // block)
    mask = torch.zeros(n, n, dtype=torch.bool)
    for i in range(n):
        qi = coords[i * block : (i + 1) * block]
        qi = qi[qi[:, 0] >= 0]
        for j in range(n):
            kj = coords[j * block : (j + 1) * block]
            kj = kj[kj[:, 0] >= 0]
            if len(qi) and len(kj):
                gaps = [max(0, int(kj[:, a].min() - qi[:, a].max()), int(qi[:, a].min() - kj[:, a].max()))
                        for a in range(3)]  # fmt: skip
                mask[i, j] = all(g <= w for g, w in zip(gaps, window, strict=True))
    return mask


@pytest.mark.parametrize(("grid", "block", "window"), [
    (TokenGrid(17, 8, 8), 64, (1, 2, 2)),  # shapes-video: a block is a frame
    (TokenGrid(5, 12, 10), 32, (1, 3, 3)),  # blocks straddle rows and frames
    (TokenGrid(1, 16, 16, prefix=24), 16, (0, 4, 4)),  # an image with joint text first
])  # fmt: skip
def test_local_window_matches_token_coordinates_and_keeps_text_and_sink(
    grid: TokenGrid, block: int, window: tuple[int, int, int]
) -> None:
    mask = family_mask(grid, block, MaskFamily.LOCAL, window)
    _, _, text = block_boxes(grid, block)
    expected = _brute_local(grid, block, window)
    expected[text] = True
    expected[:, text] = True
    first_grid_block = grid.prefix // block
    expected[:, first_grid_block] = True
    assert torch.equal(mask, expected)
    assert bool(mask.diagonal().all())


def test_families_on_the_video_grid() -> None:
    grid = TokenGrid(17, 8, 8)  # 1,088 tokens: a 64-token block is one frame
    spatial = family_mask(grid, 64, MaskFamily.SPATIAL)
    assert torch.equal(spatial, torch.eye(17, dtype=torch.bool) | (torch.arange(17) == 0)[None])
    assert bool(family_mask(grid, 64, MaskFamily.TEMPORAL).all())  # every frame-block covers every place
    local = family_mask(grid, 64, MaskFamily.LOCAL, (2, 8, 8))
    i, j = torch.arange(17)[:, None], torch.arange(17)[None]
    assert torch.equal(local, ((i - j).abs() <= 2) | (j == 0))
    assert bool(family_mask(grid, 64, MaskFamily.DENSE).all())
    with pytest.raises(ValueError, match="topk_mask"):
        family_mask(grid, 64, MaskFamily.TOPK)


def test_topk_keeps_the_largest_masses_and_the_always_kept_blocks() -> None:
    grid = TokenGrid(1, 8, 8, prefix=16)  # blocks of 16: one text block, four image blocks
    g = torch.Generator().manual_seed(0)
    mass = torch.rand(5, 5, generator=g)
    mask = topk_mask(mass, grid, 16, 0.4)
    assert bool(mask[0].all()) and bool(mask[:, 0].all()) and bool(mask[:, 1].all())  # text row/col, sink
    for r in range(1, 5):
        assert bool(mask[r, mass[r].topk(2).indices].all())
    with pytest.raises(ValueError, match="density"):
        topk_mask(mass, grid, 16, 0.0)
    with pytest.raises(ValueError, match="blocks"):
        topk_mask(torch.rand(4, 4), grid, 16, 0.5)
