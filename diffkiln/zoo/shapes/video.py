"""Procedural, seeded captioned clips of the "moving shapes" world (the video side of the shapes
world, :mod:`diffkiln.zoo.shapes.dataset`).

A clip shows one or two coloured shapes; each moves left, right, up or down at constant speed, or
stays at a named position: "a red circle moving right", "a blue square moving up while a yellow
triangle stays on the left". Compositions are split into *seen* and *held-out* as the image world's
are. Frames are rendered by the image world's supersampled renderer.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from itertools import product

import numpy as np
from PIL import Image, ImageDraw

from diffkiln.zoo.shapes.dataset import ObjectSpec, PromptSet, Split, cycled, draw_object
from diffkiln.zoo.shapes.vocab import (
    BACKGROUND_RGB,
    IMAGE_SIZE,
    POSITION_ANCHORS,
    POSITION_PHRASES,
    Color,
    Position,
    Shape,
)

__all__ = [
    "VIDEO_FRAMES",
    "Motion",
    "MovingObject",
    "VideoScene",
    "all_video_scenes",
    "eval_video_scenes",
    "parse_video_prompt",
    "render_clip",
    "sample_training_clip",
    "video_prompt_words",
]

VIDEO_FRAMES = 17
"""Frames per clip."""
_SUPERSAMPLE = 4
_SINGLE_SIZE, _PAIR_SIZE = (16.0, 22.0), (13.0, 17.0)
_TRAVEL = (20.0, 28.0)  # pixels a moving object covers over the clip
_MARGIN = 11.0  # centres stay this far from the border
_JITTER = 3.0


class Motion(str, Enum):
    """What an object does over the clip."""

    LEFT = "left"
    RIGHT = "right"
    UP = "up"
    DOWN = "down"
    STAYS = "stays"

    @property
    def direction(self) -> tuple[int, int]:
        """Unit (dx, dy) in image coordinates (y grows downwards); (0, 0) for STAYS."""
        return {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1), "stays": (0, 0)}[self.value]


@dataclass(frozen=True)
class MovingObject:
    """One object and its motion; an object that stays has a position."""

    obj: ObjectSpec
    motion: Motion
    position: Position | None = None

    def __post_init__(self) -> None:
        if (self.motion is Motion.STAYS) != (self.position is not None):
            raise ValueError("an object that stays needs a position, and only such an object has one")

    @property
    def phrase(self) -> str:
        """``"a red circle moving right"`` or ``"a red circle stays on the left"``."""
        if self.motion is Motion.STAYS:
            assert self.position is not None
            return f"{self.obj.phrase} stays {POSITION_PHRASES[self.position]}"
        return f"{self.obj.phrase} moving {self.motion.value}"


@dataclass(frozen=True)
class VideoScene:
    """One or two moving objects of different colours."""

    objects: tuple[MovingObject, ...]

    def __post_init__(self) -> None:
        if len(self.objects) not in (1, 2):
            raise ValueError(f"a clip has one or two objects, got {len(self.objects)}")
        if len({o.obj.color for o in self.objects}) != len(self.objects):
            raise ValueError("the objects of a clip need different colours")

    @property
    def prompt(self) -> str:
        """The caption: the objects' phrases joined by "while"."""
        return " while ".join(o.phrase for o in self.objects)

    @property
    def split(self) -> Split:
        """Seen or held-out: about one composition in five is held out of training."""
        keys = [_key(o) for o in self.objects]
        value = keys[0] if len(keys) == 1 else 7 * keys[0] + 3 * keys[1]
        return Split.HELDOUT if value % 5 == 0 else Split.SEEN


def _key(o: MovingObject) -> int:
    c, s = list(Color).index(o.obj.color), list(Shape).index(o.obj.shape)
    m = list(Motion).index(o.motion) + (list(Position).index(o.position) if o.position else 0)
    return c + 2 * s + 3 * m + 1


def _crowded(a: MovingObject, b: MovingObject) -> bool:
    """Two objects that stay at anchors too close for both to be drawn apart (the same position,
    or the centre and a side)."""
    if a.position is None or b.position is None:
        return False
    (ax, ay), (bx, by) = POSITION_ANCHORS[a.position], POSITION_ANCHORS[b.position]
    return float(np.hypot(ax - bx, ay - by)) < 24.0


def _movers() -> list[MovingObject]:
    out = []
    for color, shape, motion in product(Color, Shape, Motion):
        obj = ObjectSpec(color, shape)
        if motion is Motion.STAYS:
            out += [MovingObject(obj, motion, p) for p in Position]
        else:
            out.append(MovingObject(obj, motion))
    return out


def all_video_scenes(pairs: bool, split: Split | None = None) -> list[VideoScene]:
    """Every single-object (or two-object) composition, optionally of one split only."""
    movers = _movers()
    if not pairs:
        scenes = [VideoScene((m,)) for m in movers]
    else:
        scenes = [VideoScene((a, b)) for a, b in product(movers, movers) if a.obj.color != b.obj.color
                  and not _crowded(a, b)]  # fmt: skip
    return [s for s in scenes if split is None or s.split is split]


def parse_video_prompt(prompt: str) -> VideoScene:
    """The scene of a caption of this world.

    Raises:
        ValueError: the caption is outside the grammar; the message shows the forms.
    """
    parts = prompt.strip().lower().split(" while ")
    objects = []
    for part in parts:
        words = part.split()
        if len(words) < 4 or words[0] != "a":
            raise ValueError(f"cannot parse {prompt!r}: expected 'a COLOR SHAPE moving DIR' or 'a COLOR SHAPE stays "
                             "POSITION', joined by 'while'")  # fmt: skip
        obj = ObjectSpec(Color(words[1]), Shape(words[2]))
        rest = " ".join(words[3:])
        if rest.startswith("moving "):
            objects.append(MovingObject(obj, Motion(rest.removeprefix("moving "))))
            continue
        phrases = {f"stays {v}": k for k, v in POSITION_PHRASES.items()}
        if rest not in phrases:
            raise ValueError(f"cannot parse {part!r}: after the shape, 'moving left|right|up|down' or 'stays' + "
                             f"one of {sorted(POSITION_PHRASES.values())}")  # fmt: skip
        objects.append(MovingObject(obj, Motion.STAYS, phrases[rest]))
    return VideoScene(tuple(objects))


def _path(o: MovingObject, size: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Start and end centre of one object."""
    lo, hi = _MARGIN + size / 2 - 4, IMAGE_SIZE - _MARGIN - size / 2 + 4
    # Across the motion an object may go nearer the border, so that it can pass one that stays.
    across_lo, across_hi = size / 2 + 2, IMAGE_SIZE - size / 2 - 2
    if o.motion is Motion.STAYS:
        assert o.position is not None
        start = np.asarray(POSITION_ANCHORS[o.position]) + rng.uniform(-_JITTER, _JITTER, size=2)
        return start, start
    dx, dy = o.motion.direction
    travel = rng.uniform(*_TRAVEL)
    across = rng.uniform(across_lo, across_hi)
    begin = rng.uniform(lo, hi - travel)
    along = np.array([begin, begin + travel])
    if dx + dy < 0:
        along = along[::-1]
    if dx:
        return np.array([along[0], across]), np.array([along[1], across])
    return np.array([across, along[0]]), np.array([across, along[1]])


def _apart(paths: list[tuple[np.ndarray, np.ndarray, float]]) -> bool:
    if len(paths) < 2:
        return True
    (a0, a1, sa), (b0, b1, sb) = paths
    for t in np.linspace(0.0, 1.0, VIDEO_FRAMES):
        if np.linalg.norm((a0 + t * (a1 - a0)) - (b0 + t * (b1 - b0))) < (sa + sb) / 2 + 3:
            return False
    return True


def render_clip(scene: VideoScene, seed: int | np.random.Generator) -> list[Image.Image]:
    """The clip's ``VIDEO_FRAMES`` RGB frames of ``IMAGE_SIZE`` pixels, deterministic for a seed.

    Raises:
        ValueError: no non-overlapping layout was found for a pair (an extreme composition).
    """
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    sizes = _SINGLE_SIZE if len(scene.objects) == 1 else _PAIR_SIZE
    for _ in range(2000):
        paths = []
        for o in scene.objects:
            size = float(rng.uniform(*sizes))
            start, end = _path(o, size, rng)
            paths.append((start, end, size))
        if _apart(paths):
            break
    else:
        raise ValueError(f"no layout keeps the objects of {scene.prompt!r} apart")
    frames = []
    big = IMAGE_SIZE * _SUPERSAMPLE
    for t in np.linspace(0.0, 1.0, VIDEO_FRAMES):
        img = Image.new("RGB", (big, big), BACKGROUND_RGB)
        draw = ImageDraw.Draw(img)
        for o, (start, end, size) in zip(scene.objects, paths, strict=True):
            cx, cy = start + t * (end - start)
            draw_object(draw, o.obj, float(cx), float(cy), size)
        frames.append(img.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BOX))
    return frames


def sample_training_clip(rng: np.random.Generator, pair_fraction: float = 0.5) -> VideoScene:
    """A random scene from the *seen* compositions only."""
    pool = _SEEN_PAIRS if rng.random() < pair_fraction else _SEEN_SINGLES
    return pool[int(rng.integers(len(pool)))]


_SEEN_SINGLES = all_video_scenes(False, Split.SEEN)
_SEEN_PAIRS = all_video_scenes(True, Split.SEEN)


def eval_video_scenes(prompt_set: PromptSet, n: int, seed: int = 0) -> list[VideoScene]:
    """A deterministic evaluation list of ``n`` clips' scenes, covering the set's compositions evenly
    (as :func:`diffkiln.zoo.shapes.eval_scenes` does for images).

    Args:
        prompt_set: single (seen compositions), single_heldout, or pairs (seen compositions).
        n: number of scenes; compositions repeat once all have been used.
        seed: shuffles the order of compositions. Default 0.

    Raises:
        ValueError: ``n`` is not positive.
    """
    if n <= 0:
        raise ValueError(f"n must be positive, got {n}")
    if prompt_set is PromptSet.SINGLE:
        pool = _SEEN_SINGLES
    elif prompt_set is PromptSet.SINGLE_HELDOUT:
        pool = all_video_scenes(False, Split.HELDOUT)
    else:
        pool = _SEEN_PAIRS
    return cycled(pool, n, seed)


def video_prompt_words() -> list[str]:
    """Every word a caption of the moving-shapes world can hold (sorted, unique)."""
    words = {"a", "moving", "stays", "while", *(m.value for m in Motion)}
    words.update(c.value for c in Color)
    words.update(s.value for s in Shape)
    for phrase in POSITION_PHRASES.values():
        words.update(phrase.split())
    return sorted(words)
