"""The cache search's recorder: which elements of each recorded tensor it keeps."""

from __future__ import annotations

import torch

from diffkiln.calibrate.blocks import BlockLayout, BlockList
from diffkiln.calibrate.cache_stats import SUBSAMPLE, CacheRecorder


def _recorder() -> CacheRecorder:
    return CacheRecorder(BlockLayout(("b0", "b1"), (BlockList(0, 2),), "test"), seed=0)


def test_a_streams_input_and_output_are_kept_at_the_same_positions() -> None:
    # A residual candidate reuses out.e - in.s element by element: a subsample of each at positions
    # of its own made it a difference of unrelated elements.
    rec = _recorder()
    rec.current = {}
    x = torch.randn(4, 3 * SUBSAMPLE)
    rec.keep("in.0", [x])
    rec.keep("out.1", [x + 1.0])
    torch.testing.assert_close(rec.current["out.1"] - rec.current["in.0"], torch.ones(SUBSAMPLE))


def test_calls_of_another_size_are_kept_at_positions_of_their_own() -> None:
    # LTX-2 runs both guidance branches in one call of batch 2, and other guidance in calls of batch 1.
    rec = _recorder()
    for batch in (2, 1, 2):
        rec.current = {}
        x = torch.arange(batch * 2 * SUBSAMPLE, dtype=torch.float32)
        rec.keep("in.0", [x])
        assert rec.current["in.0"].numel() == SUBSAMPLE and rec.current["in.0"].max() < x.numel()
