"""Report judging on both judges, fed ground-truth samples (no model needed): the shapes-video
judge scores rendered clips per set and attribute, misses wrong ones, and the page shows strips."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from diffkiln.generation import GenerationResult, frame_strip, save_outputs
from diffkiln.report.evaluate import Report, ReportConfig
from diffkiln.report.html import render_html
from diffkiln.report.judging import judge_all, prompt_list, quality
from diffkiln.zoo.registry import SHAPES_VIDEO, JudgeKind
from diffkiln.zoo.shapes import PromptSet, Split, eval_scenes, render
from diffkiln.zoo.shapes.video import VIDEO_FRAMES, all_video_scenes, eval_video_scenes, render_clip


def _result(prompts: list[str], clips: list[list] | None, images: list | None = None) -> GenerationResult:
    images = images if images is not None else [c[0] for c in clips or []]
    return GenerationResult(prompts, images, 20, 5.0, 0, "x", 0.0, videos=clips)


@pytest.mark.parametrize("prompt_set", list(PromptSet), ids=lambda p: p.value)
def test_eval_video_scenes_are_deterministic_and_cover_their_set(prompt_set: PromptSet) -> None:
    a, b = eval_video_scenes(prompt_set, 40, seed=3), eval_video_scenes(prompt_set, 40, seed=3)
    want = Split.HELDOUT if prompt_set is PromptSet.SINGLE_HELDOUT else Split.SEEN
    pool = all_video_scenes(prompt_set is PromptSet.PAIRS, want)
    # Every composition once before any repeats (21 held-out single compositions).
    assert a == b and len(set(a)) == min(40, len(pool)) and len(a) == 40
    assert all(s.split is want and len(s.objects) == (2 if prompt_set is PromptSet.PAIRS else 1) for s in a)
    with pytest.raises(ValueError, match="positive"):
        eval_video_scenes(prompt_set, 0)


def test_video_prompts_and_calibration_prompts_come_from_the_video_world() -> None:
    prompts = prompt_list(ReportConfig(eval_size=5), JudgeKind.SHAPES_VIDEO)
    assert len(prompts) == 15 and all("moving" in p or "stays" in p for p in prompts)
    calib = SHAPES_VIDEO.calibration_prompts(6)
    assert calib is not None and sum(" while " in p for p in calib) == 3


def test_ground_truth_clips_score_right_and_reversed_ones_are_missed() -> None:
    singles = eval_video_scenes(PromptSet.SINGLE, 12, seed=1)
    pairs = eval_video_scenes(PromptSet.PAIRS, 12, seed=1)
    scenes = singles + pairs
    clips = [render_clip(s, i) for i, s in enumerate(scenes)]
    q = quality(judge_all(_result([s.prompt for s in scenes], clips), JudgeKind.SHAPES_VIDEO))
    # The judge agrees with ground truth on >= 98% of attributes (tests/zoo/test_video_world.py).
    assert q["content_accuracy"] >= 11 / 12 and q["content_accuracy_pairs"] >= 11 / 12
    assert q["n_prompts_by_set"] == {"single": 12, "single_heldout": 0, "pairs": 12, "pairs_heldout": 0}
    assert set(q["attribute_accuracy"]) == {"color", "shape", "motion"}
    movers = [(s, c) for s, c in zip(scenes, clips, strict=True) if all(o.motion.value != "stays" for o in s.objects)]
    backwards = judge_all(_result([s.prompt for s, _ in movers], [c[::-1] for _, c in movers]), JudgeKind.SHAPES_VIDEO)
    rq = quality(backwards)
    assert rq["attribute_accuracy"]["motion"] <= 0.05 and rq["attribute_accuracy"]["color"] >= 0.95
    assert all("motion" in j.verdict.reason for j in backwards if j.verdict is not None)


def test_image_judge_still_scores_images_and_ignores_foreign_prompts() -> None:
    scenes = eval_scenes(PromptSet.SINGLE, 4, seed=0)
    images = [render(s, i) for i, s in enumerate(scenes)]
    judged = judge_all(_result([*(s.prompt for s in scenes), "a cat"], None, [*images, images[0]]), JudgeKind.SHAPES)
    q = quality(judged)
    assert q["content_accuracy"] == 1.0 and q["n_unjudged"] == 1
    assert set(q["attribute_accuracy"]) == {"color", "shape", "position"}


def test_report_page_shows_clips_as_frame_strips(tmp_path: Path) -> None:
    scene = all_video_scenes(False, Split.SEEN)[0]
    clip = render_clip(scene, 0)
    judged = judge_all(_result([scene.prompt], [clip]), JudgeKind.SHAPES_VIDEO)
    strip = judged[0].image
    assert strip.height == 64 and strip.width == 9 * 64 + 8 * 2  # frames 0, 2, ..., 16
    assert np.array_equal(np.asarray(strip)[:, -64:], np.asarray(clip[-1].convert("RGB")))
    data = {"target": "t", "target_path": "p", "pipeline_class": "WanPipeline", "settings": {}, "timing": {},
            "quality": quality(judged)}  # fmt: skip
    page = render_html(Report(data=data, images=judged))
    assert "1 clips, 0 misses" in page and "cell  strip" in page


def test_generate_writes_a_gif_and_a_frame_strip_per_clip(tmp_path: Path) -> None:
    scene = all_video_scenes(False, Split.SEEN)[0]
    clip = render_clip(scene, 0)
    paths = save_outputs(_result([scene.prompt], [clip]), tmp_path)
    assert [p.name for p in paths] == ["0000_" + scene.prompt.replace(" ", "-") + ".gif",
                                       "0000_" + scene.prompt.replace(" ", "-") + ".strip.png"]  # fmt: skip
    from PIL import Image

    with Image.open(paths[0]) as gif:
        assert gif.n_frames == VIDEO_FRAMES
    assert Image.open(paths[1]).size == frame_strip(clip).size
