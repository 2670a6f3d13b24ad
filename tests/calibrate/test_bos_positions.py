"""BOS-aware rows: only positions that hold the same real token for every prompt, never padding.

Two one-word prompts leave every position after the first few tokens padding, identical in both:
a check on the calibration prompts alone would call all of them prompt-invariant. The verified
positions must be CLIP's BOS (position 0) and nothing for T5, which has no BOS token.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from diffkiln.calibrate import CalibrationConfig, calibrate
from diffkiln.zoo.architectures import TINY_ARCHITECTURES, build_tiny_pipeline

# The sequence input of each denoiser and its verified invariant positions.
EXPECTED = {
    "tiny-sd15": [0],  # CLIP: BOS
    "tiny-sd3": [0],  # CLIP-L and CLIP-G BOS first, then T5 tokens: the joint sequence starts with BOS
    "tiny-pixart": [],  # T5 alone: no BOS
    "tiny-flux": [],  # T5 sequence (CLIP gives the pooled vector only)
    "tiny-wan": [],  # UMT5
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_padding_is_never_prompt_invariant(name: str, tmp_path: Path) -> None:
    pipe = build_tiny_pipeline(name, tmp_path / "scratch")
    config = CalibrationConfig(("a cat", "a dog"), steps=2, progress=False,
                               call_kwargs=tuple(TINY_ARCHITECTURES[name].call_kwargs))  # fmt: skip
    stats = calibrate(pipe, config)
    assert stats.invariant_positions() == EXPECTED[name]
    entry = next(iter(stats.bos.values()))
    assert "probe prompts" in entry["evidence"]
    # Without the full-length probes nothing can be verified, so nothing is assumed invariant.
    unverified = calibrate(pipe, CalibrationConfig(("a cat", "a dog"), steps=2, progress=False, bos_probe=False,
                                                   call_kwargs=config.call_kwargs))  # fmt: skip
    assert unverified.invariant_positions() == []


def test_a_window_longer_than_640_tokens_leaves_its_padding_variant(tmp_path: Path) -> None:
    # HunyuanVideo 1.5 reads 1000 text tokens, LTX-2 1024. Probes of 640 words ended inside such a
    # window: both probes padded from there on, identically, and every padded position was taken for
    # a BOS row (stored per text-reading layer).
    name = "tiny-wan"
    call = (*TINY_ARCHITECTURES[name].call_kwargs, ("max_sequence_length", 1024))
    config = CalibrationConfig(("a cat", "a dog"), steps=1, progress=False, call_kwargs=call)
    stats = calibrate(build_tiny_pipeline(name, tmp_path / "scratch"), config)
    assert next(iter(stats.bos.values()))["evidence"].startswith("rows identical")
    assert stats.invariant_positions() == []
