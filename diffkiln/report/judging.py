"""Content judging for reports: which prompts a judge scores, each sample's verdict, and the
accuracy per prompt set.

Two judges: the shapes image judge (:func:`diffkiln.zoo.shapes.judge`) and the moving-shapes video
judge (:func:`diffkiln.zoo.shapes.video_judge.judge_video`). A video sample is shown as its frame
strip; its verdict covers every frame.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from PIL import Image

from diffkiln.calibrate.prompts import generic_prompts
from diffkiln.core import metrics
from diffkiln.core.errors import InvalidInputError
from diffkiln.generation import frame_strip, read_prompts
from diffkiln.zoo.registry import JudgeKind
from diffkiln.zoo.shapes import PairScene, PromptSet, Split, Verdict, eval_scenes, judge, parse_prompt
from diffkiln.zoo.shapes.video import eval_video_scenes, parse_video_prompt
from diffkiln.zoo.shapes.video_judge import VideoVerdict, judge_video

if TYPE_CHECKING:
    from diffkiln.report.evaluate import ReportConfig

__all__ = ["JudgedImage", "judge_all", "prompt_list", "prompt_source", "quality"]


@dataclass
class JudgedImage:
    """One evaluation sample (an image, or a clip's frame strip) with its prompt, set and (when
    judged) the verdict."""

    prompt: str
    image: Image.Image
    prompt_set: str | None
    verdict: Verdict | VideoVerdict | None

    @property
    def correct(self) -> bool | None:
        """The judge's decision, or None when the prompt was not judged."""
        return None if self.verdict is None else self.verdict.correct


def _set_of(prompt: str, judge_kind: JudgeKind) -> str | None:
    """The evaluation set a prompt's composition belongs to, or None outside the judge's grammar."""
    try:
        scene = parse_video_prompt(prompt) if judge_kind is JudgeKind.SHAPES_VIDEO else parse_prompt(prompt)
    except ValueError:
        return None
    pair = isinstance(scene, PairScene) or len(getattr(scene, "objects", ())) == 2
    if pair:
        return PromptSet.PAIRS.value if scene.split is Split.SEEN else "pairs_heldout"
    return PromptSet.SINGLE.value if scene.split is Split.SEEN else PromptSet.SINGLE_HELDOUT.value


def prompt_list(config: ReportConfig, judge_kind: JudgeKind = JudgeKind.SHAPES) -> list[str]:
    """The evaluation prompts: the prompts file, else for a judge ``eval_size`` prompts of each of
    its three sets (single, single_heldout, pairs), else ``eval_size`` everyday captions."""
    if config.eval_prompts is not None:
        return read_prompts(config.eval_prompts)
    if judge_kind is JudgeKind.SHAPES_VIDEO:
        return [s.prompt for ps in PromptSet for s in eval_video_scenes(ps, config.eval_size, seed=0)]
    if judge_kind is JudgeKind.SHAPES:
        return [s.prompt for ps in PromptSet for s in eval_scenes(ps, config.eval_size, seed=0)]
    return generic_prompts(config.eval_size)


def prompt_source(
    config: ReportConfig, judge_kind: JudgeKind, recorded: list[str] | None, target: str
) -> tuple[list[str], str]:
    """The evaluation prompts and where they come from, said in words for the user.

    In order: the prompts file; a judge's evaluation sets; the calibration prompts a bundle
    recorded (up to ``eval_size``). A model with none of these has no prompts of its own domain
    that diffkiln knows, so the user is asked for a file rather than given captions from elsewhere.

    Args:
        config: the report settings (``eval_prompts``, ``eval_size``).
        judge_kind: the judge that scores the samples.
        recorded: the calibration prompts the bundle recorded, or None.
        target: the target's name, for the message.

    Raises:
        InvalidInputError: no prompts file, no judge and no recorded prompts.
    """
    if config.eval_prompts is not None:
        prompts = read_prompts(config.eval_prompts)
        return prompts, f"{len(prompts)} prompts from {config.eval_prompts}"
    if judge_kind.scores:
        prompts = prompt_list(config, judge_kind)
        return prompts, f"the {judge_kind.value} judge's evaluation sets ({len(prompts)} prompts)"
    if recorded:
        prompts = list(recorded[: config.eval_size])
        return prompts, f"{len(prompts)} of the bundle's {len(recorded)} recorded calibration prompts"
    raise InvalidInputError(
        f"{target} is not a built-in model and records no calibration prompts, so diffkiln has no prompts of its "
        "domain: give --eval-prompts FILE (one prompt per line)"
    )


def judge_all(result: Any, judge_kind: JudgeKind) -> list[JudgedImage]:
    """Each generated sample with its prompt, set and (for a content judge) verdict; none for audio.

    A video is judged over all its frames and shown as its frame strip.
    """
    if not result.images:
        return []
    judged = []
    clips = result.videos or [None] * len(result.images)
    for prompt, image, clip in zip(result.prompts, result.images, clips, strict=True):
        set_name = _set_of(prompt, judge_kind) if judge_kind is not JudgeKind.NONE else None
        verdict: Verdict | VideoVerdict | None = None
        if set_name is not None and judge_kind is JudgeKind.SHAPES_VIDEO and clip is not None:
            verdict = judge_video(clip, prompt)
        elif set_name is not None and judge_kind is JudgeKind.SHAPES:
            verdict = judge(image, prompt)
        shown = frame_strip(clip) if clip is not None else image
        judged.append(JudgedImage(prompt, shown, set_name if verdict is not None else None, verdict))
    return judged


_QUALITY_KEYS = {
    PromptSet.SINGLE.value: "content_accuracy",
    PromptSet.SINGLE_HELDOUT.value: "content_accuracy_heldout",
    PromptSet.PAIRS.value: "content_accuracy_pairs",
    "pairs_heldout": "content_accuracy_pairs_heldout",
}


def quality(judged: list[JudgedImage]) -> dict[str, Any]:
    """Content accuracy per prompt set, the counts, and the per-attribute accuracy."""
    scored = [j for j in judged if j.correct is not None]
    q: dict[str, Any] = {}
    counts: dict[str, int] = {}
    for set_name, key in _QUALITY_KEYS.items():
        members = [bool(j.correct) for j in scored if j.prompt_set == set_name]
        q[key] = metrics.content_accuracy(members) if members else None
        counts[set_name] = len(members)
    q["n_prompts"] = len(scored)
    q["n_prompts_by_set"] = counts
    q["n_unjudged"] = len(judged) - len(scored)
    q["attribute_accuracy"] = _attribute_accuracy([j.verdict for j in scored if j.verdict is not None])
    return q


def _attribute_accuracy(verdicts: list[Verdict | VideoVerdict]) -> dict[str, float | None]:
    """Per-attribute accuracy over all judged objects: colour, shape, and position (images; a
    pair's relation counts as position) or motion (clips)."""
    tallies: dict[str, list[int]] = {}
    for v in verdicts:
        third = "motion" if isinstance(v, VideoVerdict) else "position"
        for o in v.objects:
            for name in ("color", "shape", third):
                t = tallies.setdefault(name, [0, 0])
                t[0] += bool(getattr(o, f"{name}_ok"))
                t[1] += 1
    names = ("color", "shape", "motion") if any(isinstance(v, VideoVerdict) for v in verdicts) else (
        "color", "shape", "position")  # fmt: skip
    return {k: (tallies[k][0] / tallies[k][1] if k in tallies and tallies[k][1] else None) for k in names}
