"""The video judge of the moving-shapes world: ``judge_video(frames, prompt)``, built on the image
judge's detector (:func:`diffkiln.zoo.shapes.judge.detect`).

Per frame, each object is found by its colour and its shape classified. Across frames:

* colour: the object is found in at least 80% of the frames;
* shape: the majority of the frames where it is found classify it as the prompt's shape;
* motion: from its box centres, the displacement between the mean of the first three and of the
  last three frames where it is found. A moving object must cover at least ``MIN_TRAVEL`` pixels in
  the named direction, more than twice its movement across, and move that way (or hold still) in
  at least 80% of its frame-to-frame steps; an object that stays must move at most ``MAX_DRIFT``
  pixels and sit nearest its named position;
* nothing else: no other colour is found in half of the frames or more.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from diffkiln.zoo.shapes.dataset import ObjectSpec
from diffkiln.zoo.shapes.judge import Blob, detect, nearest_position
from diffkiln.zoo.shapes.video import (
    Motion,
    MovingObject,
    VideoScene,
    all_video_scenes,
    parse_video_prompt,
    render_clip,
)
from diffkiln.zoo.shapes.vocab import Color

__all__ = ["MAX_DRIFT", "MIN_TRAVEL", "JudgeCheck", "MovingVerdict", "VideoVerdict", "check_judge", "judge_video"]

MIN_TRAVEL = 8.0
"""Pixels a moving object must cover along its direction (clips move 20-28)."""
MAX_DRIFT = 4.0
"""Pixels an object that stays may drift."""
_PRESENT, _MONOTONE, _STILL_STEP = 0.8, 0.8, 0.5


@dataclass(frozen=True)
class MovingVerdict:
    """Per-attribute verdict for one object of the prompt."""

    color_ok: bool
    shape_ok: bool
    motion_ok: bool
    displacement: tuple[float, float]


@dataclass(frozen=True)
class VideoVerdict:
    """The judge's decision on one clip."""

    prompt: str
    objects: tuple[MovingVerdict, ...]
    extra_objects: int

    @property
    def correct(self) -> bool:
        """Every attribute of every object right and nothing extra."""
        return self.extra_objects == 0 and all(o.color_ok and o.shape_ok and o.motion_ok for o in self.objects)

    @property
    def reason(self) -> str:
        """A short human-readable account of what was wrong ("" when correct)."""
        parts = []
        for i, o in enumerate(self.objects):
            bad = [n for n, ok in (("color", o.color_ok), ("shape", o.shape_ok), ("motion", o.motion_ok)) if not ok]
            if bad:
                parts.append(f"object {i + 1}: wrong {'/'.join(bad)}")
        if self.extra_objects:
            parts.append(f"{self.extra_objects} extra object(s)")
        return "; ".join(parts)


def _motion_ok(o: MovingObject, track: list[Blob]) -> tuple[bool, tuple[float, float]]:
    xs = np.array([b.cx for b in track])
    ys = np.array([b.cy for b in track])
    k = min(3, len(track))
    dx, dy = float(xs[-k:].mean() - xs[:k].mean()), float(ys[-k:].mean() - ys[:k].mean())
    if o.motion is Motion.STAYS:
        assert o.position is not None
        centre = Blob(track[0].color, track[0].shape, float(xs.mean()), float(ys.mean()), 0, 0.0)
        return (abs(dx) <= MAX_DRIFT and abs(dy) <= MAX_DRIFT and nearest_position(centre) == o.position), (dx, dy)
    ux, uy = o.motion.direction
    along, across = dx * ux + dy * uy, abs(dx * uy) + abs(dy * ux)
    steps = np.diff(xs) * ux + np.diff(ys) * uy
    monotone = float(np.mean(steps >= -_STILL_STEP)) if len(steps) else 0.0
    return (along >= MIN_TRAVEL and along > 2 * across and monotone >= _MONOTONE), (dx, dy)


def judge_video(frames: Sequence[Image.Image | np.ndarray], prompt: str | VideoScene) -> VideoVerdict:
    """Judge whether ``frames`` show ``prompt`` (see the module docstring).

    Raises:
        ValueError: the prompt is outside the grammar, or there are no frames.
    """
    scene = parse_video_prompt(prompt) if isinstance(prompt, str) else prompt
    if not frames:
        raise ValueError("judge_video needs at least one frame")
    per_frame = [{b.color: b for b in detect(f)} for f in frames]
    n = len(per_frame)
    counts: Counter[Color] = Counter(c for blobs in per_frame for c in blobs)
    verdicts = []
    for o in scene.objects:
        track = [blobs[o.obj.color] for blobs in per_frame if o.obj.color in blobs]
        present = len(track) >= _PRESENT * n
        if not present:
            verdicts.append(MovingVerdict(False, False, False, (0.0, 0.0)))
            continue
        shape, _ = Counter(b.shape for b in track).most_common(1)[0]
        motion_ok, disp = _motion_ok(o, track)
        verdicts.append(MovingVerdict(True, shape == o.obj.shape, motion_ok, disp))
    wanted = {o.obj.color for o in scene.objects}
    extra = sum(1 for c, k in counts.items() if c not in wanted and k >= 0.5 * n)
    return VideoVerdict(scene.prompt, tuple(verdicts), extra)


@dataclass
class JudgeCheck:
    """The judge against freshly rendered clips (:func:`check_judge`).

    Attributes:
        agree: per attribute (``color_ok``, ``shape_ok``, ``motion_ok``, ``no_extra``), how many
            ground-truth objects (or clips, for ``no_extra``) the judge found right.
        total: how many were judged, per attribute.
        rejected: per corruption (``reversed``, ``colour swapped``), how many wrong clips it rejected.
        tried: how many wrong clips of each kind it was shown.
    """

    agree: Counter[str] = field(default_factory=Counter)
    total: Counter[str] = field(default_factory=Counter)
    rejected: Counter[str] = field(default_factory=Counter)
    tried: Counter[str] = field(default_factory=Counter)

    def agreement(self, attribute: str) -> float:
        """The share of ``attribute`` the judge got right."""
        return self.agree[attribute] / self.total[attribute]


def check_judge(clips: int, seed: int) -> JudgeCheck:
    """Render ``clips`` random compositions (alternately pairs and single objects, seen and
    held-out) with new seeds; judge each against its own caption, played backwards (clips with a
    moving object), and with the first object's colour swapped for an unused one."""
    rng = np.random.default_rng(seed)
    singles, pairs = all_video_scenes(False), all_video_scenes(True)
    out = JudgeCheck()
    for i in range(clips):
        pool = singles if i % 2 else pairs
        scene = pool[int(rng.integers(len(pool)))]
        clip_seed = int(rng.integers(1 << 31))
        frames = render_clip(scene, clip_seed)
        verdict = judge_video(frames, scene)
        for o in verdict.objects:
            for attr in ("color_ok", "shape_ok", "motion_ok"):
                out.agree[attr] += getattr(o, attr)
                out.total[attr] += 1
        out.agree["no_extra"] += verdict.extra_objects == 0
        out.total["no_extra"] += 1
        if any(o.motion is not Motion.STAYS for o in scene.objects):
            out.tried["reversed"] += 1
            out.rejected["reversed"] += not judge_video(frames[::-1], scene).correct
        other = next(c for c in Color if c not in {o.obj.color for o in scene.objects})
        first = dataclasses.replace(scene.objects[0], obj=ObjectSpec(other, scene.objects[0].obj.shape))
        out.tried["colour swapped"] += 1
        swapped = render_clip(VideoScene((first, *scene.objects[1:])), clip_seed)
        out.rejected["colour swapped"] += not judge_video(swapped, scene).correct
    return out
