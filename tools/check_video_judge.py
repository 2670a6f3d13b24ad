"""Validate the video judge of the moving-shapes world on freshly rendered clips.

Renders ``--clips`` random compositions (half single objects, half pairs; seen and held-out) with
new seeds, and reports the judge's agreement with the ground truth per attribute (colour, shape,
motion, no extra object), and how many deliberately wrong clips it rejects: the frames reversed
(for clips with a moving object) and the first object's colour swapped for an unused one.

Usage: python tools/check_video_judge.py [--clips 1000] [--seed 2026]
"""

from __future__ import annotations

import argparse
import time

from diffkiln.zoo.shapes.video_judge import check_judge


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clips", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=2026)
    a = ap.parse_args()
    t0 = time.perf_counter()
    check = check_judge(a.clips, a.seed)
    print(f"{a.clips} clips in {time.perf_counter() - t0:.1f} s")
    for attr in check.total:
        print(f"agreement {attr}: {check.agreement(attr):.4f} ({check.agree[attr]}/{check.total[attr]})")
    for kind in check.tried:
        print(f"rejected {kind}: {check.rejected[kind]}/{check.tried[kind]}")


if __name__ == "__main__":
    main()
