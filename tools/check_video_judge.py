"""Validate the video judge of the moving-shapes world on freshly rendered clips.

Renders ``--clips`` random compositions (half single objects, half pairs; seen and held-out) with
new seeds, and reports the judge's agreement with the ground truth per attribute (colour, shape,
motion, no extra object), and how many deliberately wrong clips it rejects: the frames reversed
(for clips with a moving object) and the first object's colour swapped for an unused one.

Usage: python tools/check_video_judge.py [--clips 1000] [--seed 2026]
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from collections import Counter

import numpy as np

from diffkiln.zoo.shapes.dataset import ObjectSpec
from diffkiln.zoo.shapes.video import Motion, VideoScene, all_video_scenes, render_clip
from diffkiln.zoo.shapes.video_judge import judge_video
from diffkiln.zoo.shapes.vocab import Color


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clips", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=2026)
    a = ap.parse_args()
    rng = np.random.default_rng(a.seed)
    singles, pairs = all_video_scenes(False), all_video_scenes(True)
    agree: Counter[str] = Counter()
    total: Counter[str] = Counter()
    rejected = Counter[str]()
    tried = Counter[str]()
    t0 = time.perf_counter()
    for i in range(a.clips):
        pool = singles if i % 2 else pairs
        scene = pool[int(rng.integers(len(pool)))]
        seed = int(rng.integers(1 << 31))
        frames = render_clip(scene, seed)
        verdict = judge_video(frames, scene)
        for o in verdict.objects:
            for attr in ("color_ok", "shape_ok", "motion_ok"):
                agree[attr] += getattr(o, attr)
                total[attr] += 1
        agree["no_extra"] += verdict.extra_objects == 0
        total["no_extra"] += 1
        if any(o.motion is not Motion.STAYS for o in scene.objects):
            tried["reversed"] += 1
            rejected["reversed"] += not judge_video(frames[::-1], scene).correct
        other = next(c for c in Color if c not in {o.obj.color for o in scene.objects})
        first = scene.objects[0]
        swapped = VideoScene((dataclasses.replace(first, obj=ObjectSpec(other, first.obj.shape)), *scene.objects[1:]))
        tried["colour swapped"] += 1
        rejected["colour swapped"] += not judge_video(render_clip(swapped, seed), scene).correct
    print(f"{a.clips} clips in {time.perf_counter() - t0:.1f} s")
    for attr in total:
        print(f"agreement {attr}: {agree[attr] / total[attr]:.4f} ({agree[attr]}/{total[attr]})")
    for kind in tried:
        print(f"rejected {kind}: {rejected[kind]}/{tried[kind]}")


if __name__ == "__main__":
    main()
