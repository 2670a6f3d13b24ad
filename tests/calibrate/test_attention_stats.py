"""Calibration records sparse-attention statistics for every long attention layer, found from the
data flow, per step, and keeps them in the disk cache."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from diffkiln.calibrate import CalibrationConfig, calibrate
from diffkiln.core.attention import find_attention_layers
from diffkiln.core.pipelines import find_denoiser
from diffkiln.generation import load_pipeline


@pytest.mark.parametrize(("name", "kwargs"), [
    ("tiny-wan", (("height", 16), ("width", 16), ("num_frames", 5), ("max_sequence_length", 32))),
    ("shapes-dit", (("max_sequence_length", 32),)),
])  # fmt: skip
def test_attention_statistics_per_layer_step_and_block(name: str, kwargs: tuple, tmp_path: Path) -> None:
    pipe = load_pipeline(name)
    config = CalibrationConfig(prompts=("a red circle on the left", "a blue square"), steps=3, batch_size=2,
                               progress=False, attention_stats=True, attention_block=16, call_kwargs=kwargs,
                               cache_dir=tmp_path)  # fmt: skip
    stats = calibrate(pipe, config)
    att = stats.attention
    assert att is not None and att.steps == 3 and att.calls_per_step in (1, 2) and att.layers
    for g in att.layers:
        mass, drop = att.mass[g.name], att.drop_error[g.name]
        qb, kb = -(-g.q_len // 16), -(-g.kv_len // 16)
        assert g.kv_len >= 32 and mass.shape == drop.shape == (3, g.heads, qb, kb)
        assert torch.allclose(mass.sum(-1), torch.ones(3, g.heads, qb), atol=1e-4)
        assert bool((drop >= 0).all())
    # Every unmasked attention layer with two key blocks or more is there, found from the data flow.
    denoiser = find_denoiser(pipe)
    found = find_attention_layers(denoiser, lambda: pipe("a red circle", num_inference_steps=3, output_type="latent",
                                                         **dict(kwargs)))  # fmt: skip
    assert {g.name for g in att.layers} == {x.name for x in found if x.kv_len >= 32 and not x.masked}
    # The others are listed with why, for the error that names them when none is recorded.
    assert att.left_dense is not None and set(att.left_dense) == {x.name for x in found} - {g.name for g in att.layers}
    for x in found:
        if x.name in att.left_dense:
            assert att.left_dense[x.name] == ("mask" if x.masked else "short", x.kv_len)
    loaded = calibrate(pipe, config).attention  # from the disk cache
    assert loaded is not None and loaded.layers == att.layers and loaded.left_dense == att.left_dense
    assert all(torch.equal(loaded.mass[g.name], att.mass[g.name]) for g in att.layers)
