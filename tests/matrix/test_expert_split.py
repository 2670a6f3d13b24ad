"""A pipeline whose sampler runs two models of one class at different steps: Wan 2.2's experts,
``transformer`` above a boundary timestep and ``transformer_2`` below it. A bundle quantizes one
denoiser; the other expert stays in floating point, and the user is told so, not left to find out."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from diffusers import WanPipeline

from diffkiln.cli import main
from diffkiln.zoo.architectures.video import tiny_wan
from tests.matrix.builders import save_built


def _wan22(scratch: Path) -> WanPipeline:
    """Tiny Wan with a second expert: the first's weights perturbed, the boundary at 0.6."""
    base = tiny_wan(scratch)
    expert = copy.deepcopy(base.transformer)
    with torch.no_grad():
        for p in expert.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return WanPipeline(tokenizer=base.tokenizer, text_encoder=base.text_encoder, vae=base.vae,
                       transformer=base.transformer, scheduler=base.scheduler, transformer_2=expert,
                       boundary_ratio=0.6)  # fmt: skip


def test_the_expert_left_in_floating_point_is_named(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = save_built(_wan22, tmp_path / "wan22")
    args = ["optimize", str(folder), "--calib-size", "2", "--steps", "4", "--no-progress", "--out", str(tmp_path / "b"),
            "--cache-dir", str(tmp_path / "cache")]  # fmt: skip
    for key, value in (("height", 16), ("width", 16), ("num_frames", 5), ("max_sequence_length", 32)):
        args += ["--call-arg", f"{key}={value}"]
    assert main(args) == 0
    warned = [line for line in capsys.readouterr().err.splitlines() if "of the denoiser's class" in line]
    assert warned == [
        "warning: WanPipeline's sampler also runs transformer_2, of the denoiser's class (an expert for other noise "
        "levels, as Wan 2.2's): this bundle quantizes transformer only; transformer_2 stays in floating point"
    ], warned
    manifest = json.loads((tmp_path / "b" / "manifest.json").read_text())
    assert manifest["plan"]["denoiser"] == "transformer"
    evidence = manifest["plan"]["notes"]["calibration"]["denoiser_evidence"]
    assert evidence.endswith("also run in the sampler loop, kept in floating point: transformer_2"), evidence
    # Said again wherever the bundle is inspected, also when calibration came from the cache.
    capsys.readouterr()
    assert main(["inspect", str(tmp_path / "b")]) == 0
    found = [line for line in capsys.readouterr().out.splitlines() if line.startswith("found    ")]
    assert found == [f"found    {evidence}"], found
