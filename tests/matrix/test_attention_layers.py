"""Attention layers found from the data flow (the innermost modules that call SDPA) on the image and
video transformers of the matrix, and the interception of their calls: transparent when the
handler passes, and really in the computation when it answers."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from diffkiln.calibrate.sources import batch_kwargs, source_for
from diffkiln.core.attention import AttentionCall, attention_calls, find_attention_layers
from diffkiln.core.pipelines import accepted_call_kwargs, find_denoiser
from diffkiln.generation import load_pipeline
from diffkiln.zoo.catalog import TINY_CATALOG
from diffkiln.zoo.registry import resolve_target
from tests.matrix.builders import MATRIX, build

BUILTIN = {e.name: dict(e.call_kwargs) for e in TINY_CATALOG}
NAMES = ["tiny-sd15", "tiny-sd3", "tiny-flux", "tiny-pixart", "tiny-wan", "cogvideox", "ltx", "hunyuan-dit"]


def _pipe_and_call(name: str, root: Path) -> tuple[object, dict[str, object]]:
    folder = resolve_target(name).path if name in BUILTIN else build(name, root / name)
    pipe = load_pipeline(str(folder))
    pipe.set_progress_bar_config(disable=True)  # type: ignore[attr-defined]
    given = BUILTIN.get(name) or dict(MATRIX[name].call_kwargs)
    source = source_for(pipe, ["a red circle on the left"], 1)
    call = {**batch_kwargs(pipe, [source.sample(0)]), **accepted_call_kwargs(pipe, {"num_inference_steps": 2,
            "output_type": "latent"}), **accepted_call_kwargs(pipe, given, strict=True)}  # fmt: skip
    return pipe, call


def _run(pipe: object, call: dict[str, object]) -> torch.Tensor:
    out = pipe(**call, generator=torch.Generator().manual_seed(0))  # type: ignore[operator]
    return next(v for v in vars(out).values() if isinstance(v, torch.Tensor))


@pytest.mark.parametrize("name", NAMES)
def test_attention_layers_are_the_modules_that_call_sdpa(name: str, tmp_path: Path) -> None:
    pipe, call = _pipe_and_call(name, tmp_path)
    denoiser = find_denoiser(pipe)
    layers = find_attention_layers(denoiser, lambda: _run(pipe, call))
    # Independent count: diffusers' attention modules hold a processor, and each calls SDPA once
    # per forward (joint text-image attention included).
    expected = {n for n, m in denoiser.named_modules() if hasattr(m, "processor") and hasattr(m, "to_q")}
    assert {layer.name for layer in layers} == expected
    assert all(layer.heads >= 1 and layer.q_len >= 1 and layer.calls >= 1 for layer in layers)

    reference = _run(pipe, call)
    with attention_calls(denoiser, lambda c: None) as calls:
        passed = _run(pipe, call)
    assert torch.equal(passed, reference) and set(calls.counts) == expected
    assert not any(getattr(m, "_forward_pre_hooks", None) for m in denoiser.modules())  # hooks removed

    def zero_first(c: AttentionCall) -> torch.Tensor | None:
        return torch.zeros_like(c.dense()) if c.layer == layers[0].name else None

    with attention_calls(denoiser, zero_first):
        changed = _run(pipe, call)
    assert not torch.equal(changed, reference)


# Where the text sits in the first attention layer's sequence (before the latent grid, after it, or
# in no such layer), and whether the grid's shape is visible (FLUX packs its latents into tokens
# before the denoiser: its grid is a row).
GRIDS = {
    "tiny-sd15": ("none", True),
    "tiny-sd3": ("suffix", True),
    "tiny-flux": ("prefix", False),
    "tiny-pixart": ("none", True),
    "tiny-wan": ("none", True),
    "cogvideox": ("prefix", True),
}


def _patch(config: object) -> tuple[int, int, int]:
    """(frames, height, width) of the denoiser's patch, from its config (1 where it has none)."""
    p = getattr(config, "patch_size", None) or 1
    if isinstance(p, (tuple, list)):
        return int(p[0]), int(p[1]), int(p[2])
    return int(getattr(config, "patch_size_t", None) or 1), int(p), int(p)


@pytest.mark.parametrize("name", sorted(GRIDS))
def test_token_grids_separate_text_from_the_latent_grid(name: str, tmp_path: Path) -> None:
    from diffkiln.calibrate.token_grids import find_token_grids

    pipe, call = _pipe_and_call(name, tmp_path)
    denoiser = find_denoiser(pipe)

    def run(seed: int) -> torch.Tensor:
        return _run_seed(pipe, call, seed)

    grids = find_token_grids(denoiser, run)
    layers = find_attention_layers(denoiser, lambda: run(0))
    assert set(grids) == {layer.name for layer in layers}
    text, shaped = GRIDS[name]
    for layer in layers:
        g = grids[layer.name]
        assert g["prefix"] + g["frames"] * g["height"] * g["width"] + g["suffix"] == layer.q_len
        assert (g["prefix"] > 0) == (text == "prefix") and (g["suffix"] > 0) == (text == "suffix")
    first = grids[layers[0].name]
    if shaped:  # the first layer's grid is the latent's, patchified
        latents = run(0)
        spatial = latents.shape[2:] if latents.dim() == 5 else (1, *latents.shape[2:])
        if name == "cogvideox":  # its latents are (batch, frames, channels, height, width)
            spatial = (latents.shape[1], *latents.shape[3:])
        pt, ph, pw = _patch(denoiser.config)
        assert (first["frames"], first["height"], first["width"]) == (
            -(-spatial[0] // pt), spatial[1] // ph, spatial[2] // pw)  # fmt: skip
    else:
        assert first["height"] == 1 and first["frames"] == 1


def _run_seed(pipe: object, call: dict[str, object], seed: int) -> torch.Tensor:
    out = pipe(**call, generator=torch.Generator().manual_seed(seed))  # type: ignore[operator]
    return next(v for v in vars(out).values() if isinstance(v, torch.Tensor))
