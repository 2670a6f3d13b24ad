"""Sparse-attention masks on diffusers classes whose text sits before (FLUX), after (SD3) or outside
(PixArt, SD1.5: cross-attention) the latent tokens of their self-attention: searched from
calibration, frozen into the bundle, and run at the planned density; on SD1.5 beside a mixed
2/4/8-bit recipe."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from diffkiln.api import MixedConfig, OptimizeConfig, SparseConfig, optimize
from diffkiln.core.metrics import sqnr_db
from diffkiln.core.sparse_plan import SparsePlan, unpack_mask
from diffkiln.runtime import load
from diffkiln.zoo.catalog import TINY_CATALOG

BUILTIN = {e.name: dict(e.call_kwargs) for e in TINY_CATALOG}
# Blocks of 16: the tiny classes' attention is 96 to 256 tokens long.
SPARSE = SparseConfig(density=0.8, block=16, validate_samples=2)
# Masked against dense latents of the same bundle after 2 steps, density 0.8: measured 31.8 dB
# (tiny-sd3) to 102 dB (tiny-pixart); 58.5 dB on tiny-sd15 with the mixed recipe.
MIN_SQNR_DB = 25.0
# Where the text sits in the masked self-attention (tests/matrix/test_attention_layers.py: GRIDS).
JOINT_TEXT = {"tiny-sd3": "suffix", "tiny-flux": "prefix"}


def _latents(pipe: object, kwargs: dict[str, object]) -> torch.Tensor:
    pipe.set_progress_bar_config(disable=True)  # type: ignore[attr-defined]
    out = pipe("a red circle on the left", num_inference_steps=2, output_type="latent",  # type: ignore[operator]
               generator=torch.Generator().manual_seed(0), **kwargs)  # fmt: skip
    return next(v for v in vars(out).values() if isinstance(v, torch.Tensor))


@pytest.mark.parametrize(("name", "mixed"), [("tiny-sd15", True), ("tiny-sd3", False), ("tiny-flux", False),
                                             ("tiny-pixart", False)])  # fmt: skip
def test_masks_are_searched_frozen_and_run_on_the_class(name: str, mixed: bool, tmp_path: Path) -> None:
    config = OptimizeConfig(out=tmp_path / "b", recipe=MixedConfig(avg_weight_bits=6) if mixed else SPARSE,
                            sparse=SPARSE if mixed else None, calib_size=2, steps=2, progress=False,
                            call_kwargs=tuple(BUILTIN[name].items()), cache_dir=tmp_path / "c")  # fmt: skip
    bundle = optimize(name, config)
    plan = SparsePlan.from_dict(json.loads((bundle / "manifest.json").read_text())["sparsity"])
    assert plan.layers and plan.block == 16 and plan.density <= 0.8 + 1e-9
    if name in JOINT_TEXT:
        assert all(lm.grid[JOINT_TEXT[name]] > 0 for lm in plan.layers)
    for lm in plan.layers:  # every row keeps the key blocks that hold text (joint attention's prefix or suffix)
        b, kv_blocks = plan.block, -(-lm.kv_len // plan.block)
        suffix_start = (lm.kv_len - lm.grid["suffix"]) // b if lm.grid["suffix"] else kv_blocks
        text = [*range(-(-lm.grid["prefix"] // b)), *range(suffix_start, kv_blocks)]
        for group in lm.masks:
            for packed in group:
                mask = unpack_mask(packed, -(-lm.q_len // b), kv_blocks)
                assert mask[:, text].all(), (lm.layer, text)
    pipe = load(bundle, "cpu")
    if mixed:  # the masks ride on a bundle whose layers run at 2, 4 and 8 bits
        assert len({lp["weight"]["bits"] for lp in pipe.diffkiln_manifest["plan"]["layers"] if lp["weight"]}) > 1
    masked = _latents(pipe, BUILTIN[name])
    assert pipe.diffkiln_sparse.density == pytest.approx(plan.density, rel=1e-6)  # measured as it ran
    dense = _latents(load(bundle, "cpu", sparse=False), BUILTIN[name])
    assert not torch.equal(masked, dense) and torch.isfinite(masked).all()
    assert sqnr_db(dense, masked) >= MIN_SQNR_DB, name
