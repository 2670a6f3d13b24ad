from __future__ import annotations

import numpy as np
import pytest

from diffkiln.zoo.shapes import (
    PairScene,
    PromptSet,
    Split,
    all_pair_scenes,
    all_single_scenes,
    eval_scenes,
    parse_prompt,
    render,
    sample_training_scene,
)
from diffkiln.zoo.shapes.vocab import Color, Position, Shape


def test_render_is_deterministic_for_a_seed() -> None:
    scene = parse_prompt("a red circle left of a blue square")
    a, b = np.asarray(render(scene, 7)), np.asarray(render(scene, 7))
    assert a.shape == (64, 64, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b)
    assert not np.array_equal(a, np.asarray(render(scene, 8)))


def test_training_sampler_is_deterministic_and_never_draws_heldout() -> None:
    draw = lambda seed: [sample_training_scene(np.random.default_rng(seed)) for _ in range(1)]  # noqa: E731
    assert draw(3) == draw(3)
    rng = np.random.default_rng(0)
    scenes = [sample_training_scene(rng) for _ in range(3000)]
    assert all(s.split is Split.SEEN for s in scenes)
    assert any(isinstance(s, PairScene) for s in scenes) and any(not isinstance(s, PairScene) for s in scenes)


def test_split_holds_out_each_color_shape_at_exactly_one_position() -> None:
    held = all_single_scenes(Split.HELDOUT)
    assert len(held) == len(Color) * len(Shape)
    assert {(s.obj.color, s.obj.shape) for s in held} == {(c, s) for c in Color for s in Shape}
    seen = all_single_scenes(Split.SEEN)
    assert {s.position for s in seen} == set(Position)
    assert 0.1 < len(all_pair_scenes(Split.HELDOUT)) / len(all_pair_scenes()) < 0.3


@pytest.mark.parametrize("scene", all_single_scenes() + all_pair_scenes()[::7], ids=lambda s: s.prompt)
def test_prompt_round_trips(scene) -> None:
    assert parse_prompt(scene.prompt) == scene
    assert parse_prompt("  " + scene.prompt.upper() + " ") == scene


@pytest.mark.parametrize("bad", ["", "a purple circle on the left", "a red hexagon at the top", "two red circles"])
def test_parse_rejects_prompts_outside_the_grammar(bad: str) -> None:
    with pytest.raises(ValueError, match="outside the shapes grammar"):
        parse_prompt(bad)


def test_pair_of_one_colour_is_rejected() -> None:
    with pytest.raises(ValueError, match="two different colours"):
        parse_prompt("a red circle left of a red square")


@pytest.mark.parametrize("prompt_set", list(PromptSet), ids=lambda p: p.value)
def test_eval_sets_are_deterministic_and_of_their_split(prompt_set: PromptSet) -> None:
    a = eval_scenes(prompt_set, 100, seed=0)
    assert a == eval_scenes(prompt_set, 100, seed=0)
    want = Split.HELDOUT if prompt_set is PromptSet.SINGLE_HELDOUT else Split.SEEN
    assert len(a) == 100 and all(s.split is want for s in a)
    assert (prompt_set is PromptSet.PAIRS) == all(isinstance(s, PairScene) for s in a)


def test_eval_size_must_be_positive() -> None:
    with pytest.raises(ValueError, match="positive"):
        eval_scenes(PromptSet.SINGLE, 0)
