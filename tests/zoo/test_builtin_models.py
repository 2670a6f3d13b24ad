"""The two trained built-in models: offline loading, determinism, and a small quality check.

The tiny random-weight architecture models are tested in test_architectures.py.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from diffusers import DiffusionPipeline

from diffkiln.generation import GenerateConfig, generate
from diffkiln.zoo.registry import BUILTIN_MODELS, JudgeKind, get_builtin, resolve_target
from diffkiln.zoo.shapes import PromptSet, eval_scenes, judge

# The trained image models; shapes-video has its own tests (tests/zoo/test_shapes_video_model.py).
MODELS = sorted(n for n, m in BUILTIN_MODELS.items() if m.judge is JudgeKind.SHAPES)


@pytest.mark.parametrize("name", MODELS)
def test_folder_is_a_plain_diffusers_pipeline_that_loads_offline(name: str) -> None:
    path = resolve_target(name).path
    index = json.loads((path / "model_index.json").read_text())
    assert index["_class_name"] == get_builtin(name).pipeline_class
    pipe = DiffusionPipeline.from_pretrained(path, local_files_only=True)
    assert type(pipe).__name__ == get_builtin(name).pipeline_class
    # Causal CLIP with a BOS token, as later BOS-aware quantization relies on.
    te = pipe.text_encoder
    assert te.config.bos_token_id == pipe.tokenizer.bos_token_id
    assert pipe.tokenizer("a red circle").input_ids[0] == pipe.tokenizer.bos_token_id


@pytest.mark.parametrize("name", MODELS)
def test_generation_is_deterministic_and_batch_independent(name: str, shapes_pipelines) -> None:
    pipe = shapes_pipelines[name]
    target = resolve_target(name)
    prompts = ["a red circle on the left", "a blue square above a yellow triangle"]
    cfg = GenerateConfig(steps=3, seed=5, progress=False)
    a = generate(pipe, prompts, cfg, target).images
    b = generate(pipe, prompts, cfg, target).images
    assert all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(a, b, strict=True))
    # Image i depends on seed + i only, not on the batch it was generated in.
    single = generate(pipe, prompts[1:], GenerateConfig(steps=3, seed=6, progress=False), target).images
    assert np.abs(np.asarray(single[0], float) - np.asarray(a[1], float)).max() <= 2
    other = generate(pipe, prompts, GenerateConfig(steps=3, seed=99, progress=False), target).images
    assert not np.array_equal(np.asarray(a[0]), np.asarray(other[0]))


# Floors well below the measured accuracy (docs/models.md, 200 prompts per set: single-object
# content accuracy 1.0 for both models, pairs 0.835 (unet) / 0.995 (dit)) yet far above what a
# broken or untrained model scores (0.0 measured on random weights), so this catches a broken or
# degraded model without flaking on 32 prompts.
FLOORS = {PromptSet.SINGLE: {"content": 0.85, "color": 0.9}, PromptSet.PAIRS: {"content": 0.6, "color": 0.9}}


@pytest.mark.parametrize("prompt_set", list(FLOORS), ids=lambda p: p.value)
@pytest.mark.parametrize("name", MODELS)
def test_small_evaluation_is_above_a_broken_model_floor(name: str, prompt_set: PromptSet, shapes_pipelines) -> None:
    scenes = eval_scenes(prompt_set, 32, seed=0)
    target = resolve_target(name)
    result = generate(shapes_pipelines[name], [s.prompt for s in scenes], GenerateConfig(progress=False), target)
    verdicts = [judge(im, s) for im, s in zip(result.images, scenes, strict=True)]
    content = np.mean([v.correct for v in verdicts])
    color = np.mean([o.color_ok for v in verdicts for o in v.objects])
    floor = FLOORS[prompt_set]
    if "content" in floor:
        assert content >= floor["content"], f"{name} {prompt_set.value}: content accuracy {content:.3f}"
    assert color >= floor["color"], f"{name} {prompt_set.value}: colour accuracy {color:.3f}"
