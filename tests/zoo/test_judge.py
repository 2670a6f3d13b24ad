from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from diffkiln.zoo.shapes import PromptSet, content_accuracy, eval_scenes, judge, parse_prompt, render
from diffkiln.zoo.shapes.dataset import all_pair_scenes, all_single_scenes


def _ground_truth(n: int) -> list:
    rng = np.random.default_rng(1234)
    pool = all_single_scenes() + all_pair_scenes()
    return [pool[i] for i in rng.integers(len(pool), size=n)]


def test_judge_reads_1000_fresh_ground_truth_images_at_98_percent_per_attribute() -> None:
    tallies = {"color": [], "shape": [], "position": []}
    overall = []
    for i, scene in enumerate(_ground_truth(1000)):
        v = judge(render(scene, 10_000 + i), scene.prompt)
        overall.append(v.correct)
        for o in v.objects:
            tallies["color"].append(o.color_ok)
            tallies["shape"].append(o.shape_ok)
            tallies["position"].append(o.position_ok)
    for name, oks in tallies.items():
        assert np.mean(oks) >= 0.98, f"{name} accuracy {np.mean(oks):.3f}"
    assert np.mean(overall) >= 0.98


@pytest.mark.parametrize(
    ("drawn", "asked", "wrong"),
    [
        ("a red circle on the left", "a blue circle on the left", "color"),
        ("a red circle on the left", "a red square on the left", "shape"),
        ("a red circle on the left", "a red triangle on the left", "shape"),
        ("a red circle on the left", "a red circle on the right", "position"),
        ("a green square at the top", "a green square at the bottom", "position"),
        ("a red circle left of a blue square", "a red circle right of a blue square", "position"),
        ("a red circle above a blue square", "a red circle left of a blue square", "position"),
    ],
)
def test_judge_rejects_the_wrong_attribute(drawn: str, asked: str, wrong: str) -> None:
    v = judge(render(parse_prompt(drawn), 0), asked)
    assert not v.correct
    assert wrong in v.reason


def test_judge_rejects_blank_and_extra_objects() -> None:
    blank = Image.new("RGB", (64, 64))
    assert not judge(blank, "a red circle on the left").correct
    pair = render(parse_prompt("a red circle left of a blue square"), 0)
    v = judge(pair, "a red circle on the left")
    assert not v.correct and v.extra_objects == 1


def test_judge_accepts_other_image_sizes_and_arrays() -> None:
    scene = eval_scenes(PromptSet.SINGLE, 1)[0]
    img = render(scene, 3)
    assert judge(img.resize((256, 256), Image.Resampling.NEAREST), scene.prompt).correct
    assert judge(np.asarray(img), scene).correct


def test_content_accuracy_counts_fully_correct_prompts() -> None:
    scenes = eval_scenes(PromptSet.PAIRS, 4)
    imgs = [render(s, i) for i, s in enumerate(scenes)]
    assert content_accuracy(imgs, [s.prompt for s in scenes]) == 1.0
    blank = Image.new("RGB", (64, 64))
    assert content_accuracy([blank, *imgs[1:]], [s.prompt for s in scenes]) == 0.75
    with pytest.raises(ValueError, match="one prompt per image"):
        content_accuracy(imgs, [])
