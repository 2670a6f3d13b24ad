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
