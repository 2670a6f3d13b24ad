"""The moving-shapes world and its video judge: determinism, the caption grammar, the split, and
the judge on freshly rendered and on deliberately wrong clips."""

from __future__ import annotations

import re

import numpy as np
import pytest

from diffkiln.zoo.shapes.dataset import ObjectSpec, Split
from diffkiln.zoo.shapes.video import (
    VIDEO_FRAMES,
    Motion,
    MovingObject,
    all_video_scenes,
    parse_video_prompt,
    render_clip,
    sample_training_clip,
)
from diffkiln.zoo.shapes.video_judge import check_judge, judge_video
from diffkiln.zoo.shapes.vocab import Color, Position, Shape


def test_clips_are_deterministic_per_seed() -> None:
    scene = parse_video_prompt("a blue square moving up while a yellow triangle stays on the left")
    a, b, c = render_clip(scene, 5), render_clip(scene, 5), render_clip(scene, 6)
    assert len(a) == VIDEO_FRAMES and a[0].size == (64, 64)
    assert all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(a, b, strict=True))
    assert not all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(a, c, strict=True))


@pytest.mark.parametrize("prompt", ["a red circle moving right", "a green triangle stays at the top",
                                    "a blue square moving up while a yellow triangle stays on the left"])  # fmt: skip
def test_captions_round_trip(prompt: str) -> None:
    assert parse_video_prompt(prompt).prompt == prompt


def test_bad_captions_are_refused_with_the_grammar() -> None:
    with pytest.raises(ValueError, match=re.escape("moving left|right|up|down")):
        parse_video_prompt("a red circle jumping")
    with pytest.raises(ValueError, match="needs a position"):
        MovingObject(ObjectSpec(Color.RED, Shape.CIRCLE), Motion.STAYS)


def test_split_holds_out_about_a_fifth_and_training_draws_seen_only() -> None:
    singles, pairs = all_video_scenes(False), all_video_scenes(True)
    held = [s for s in singles if s.split is Split.HELDOUT]
    assert 0.1 < len(held) / len(singles) < 0.3 and 0.1 < len(all_video_scenes(True, Split.HELDOUT)) / len(pairs) < 0.3
    rng = np.random.default_rng(0)
    assert all(sample_training_clip(rng).split is Split.SEEN for _ in range(200))
    # every colour, shape and motion still occurs in training
    seen = [s for s in singles if s.split is Split.SEEN]
    assert {s.objects[0].motion for s in seen} == set(Motion) and {s.objects[0].obj.shape for s in seen} == set(Shape)


def test_judge_agrees_with_ground_truth_and_rejects_wrong_clips() -> None:
    check = check_judge(60, seed=7)
    # Measured on 1000 clips (tools/check_video_judge.py): 100% on every attribute.
    assert all(check.agreement(a) >= 0.98 for a in check.total), check
    assert check.tried["reversed"] > 20 and check.rejected == check.tried, check


def test_judge_names_what_is_wrong() -> None:
    scene = parse_video_prompt("a red circle moving right")
    frames = render_clip(scene, 0)
    verdict = judge_video(frames, "a red square moving right")
    assert verdict.objects[0].color_ok and not verdict.objects[0].shape_ok and verdict.objects[0].motion_ok
    still = judge_video([frames[0]] * VIDEO_FRAMES, scene)
    assert not still.objects[0].motion_ok and still.objects[0].displacement == (0.0, 0.0)
    stays = parse_video_prompt("a red circle stays on the right")
    assert judge_video(render_clip(stays, 1), stays).correct
    assert not judge_video(render_clip(stays, 1), parse_video_prompt("a red circle stays on the left")).correct
    assert Position.RIGHT in {o.position for o in stays.objects}
