"""Procedural, seeded captioned images of the "shapes" world.

A scene is one object at a named position ("a red circle on the left") or two objects in a
relation ("a red circle left of a blue square"). Attribute combinations are split into *seen*
(used for training) and *held-out* (never trained on), so evaluation can report generalisation
to new compositions. Rendering is supersampled, so edges are anti-aliased like real images.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum
from itertools import product
from typing import TypeVar

import numpy as np
from PIL import Image, ImageDraw

from diffkiln.zoo.shapes.vocab import (
    BACKGROUND_RGB,
    COLOR_RGB,
    IMAGE_SIZE,
    POSITION_ANCHORS,
    POSITION_PHRASES,
    Color,
    Position,
    Relation,
    Shape,
)

T = TypeVar("T")

__all__ = [
    "ObjectSpec",
    "PairScene",
    "PromptSet",
    "Scene",
    "SingleScene",
    "Split",
    "all_pair_scenes",
    "all_single_scenes",
    "cycled",
    "draw_object",
    "eval_scenes",
    "parse_prompt",
    "render",
    "sample_training_scene",
]

_SUPERSAMPLE = 4
_SINGLE_SIZE = (18.0, 24.0)  # bounding-box side range of a lone object, pixels
_PAIR_SIZE = (14.0, 18.0)
_SINGLE_JITTER = 3.0  # max shift of a lone object from its anchor, pixels
_PAIR_NEAR, _PAIR_FAR = (12.0, 22.0), (42.0, 52.0)  # the two bands objects of a pair sit in
_PAIR_CROSS = (27.0, 37.0)  # the band across the relation axis


class Split(str, Enum):
    """Which side of the composition split a scene belongs to."""

    SEEN = "seen"
    HELDOUT = "heldout"


class PromptSet(str, Enum):
    """The three evaluation sets reported for a shapes model."""

    SINGLE = "single"
    SINGLE_HELDOUT = "single_heldout"
    PAIRS = "pairs"


@dataclass(frozen=True)
class ObjectSpec:
    """One object: a colour and a shape."""

    color: Color
    shape: Shape

    @property
    def phrase(self) -> str:
        """The noun phrase, e.g. ``"a red circle"``."""
        return f"a {self.color.value} {self.shape.value}"


@dataclass(frozen=True)
class SingleScene:
    """One object at a named position."""

    obj: ObjectSpec
    position: Position

    @property
    def prompt(self) -> str:
        """The caption, e.g. ``"a red circle on the left"``."""
        return f"{self.obj.phrase} {POSITION_PHRASES[self.position]}"

    @property
    def objects(self) -> tuple[ObjectSpec, ...]:
        """The objects in the scene, in prompt order."""
        return (self.obj,)

    @property
    def split(self) -> Split:
        """Seen or held-out. Each (colour, shape) is held out at exactly one position."""
        c = list(Color).index(self.obj.color)
        s = list(Shape).index(self.obj.shape)
        p = list(Position).index(self.position)
        return Split.HELDOUT if (c + 2 * s + p) % 5 == 0 else Split.SEEN


@dataclass(frozen=True)
class PairScene:
    """Two objects of different colours: ``first`` is ``relation`` ``second``."""

    first: ObjectSpec
    relation: Relation
    second: ObjectSpec

    def __post_init__(self) -> None:
        if self.first.color == self.second.color:
            raise ValueError(
                f"a pair needs two different colours, got {self.first.color.value} twice; "
                "pick another colour for one of the objects"
            )

    @property
    def prompt(self) -> str:
        """The caption, e.g. ``"a red circle left of a blue square"``."""
        return f"{self.first.phrase} {self.relation.value} {self.second.phrase}"

    @property
    def objects(self) -> tuple[ObjectSpec, ...]:
        """The objects in the scene, in prompt order."""
        return (self.first, self.second)

    @property
    def split(self) -> Split:
        """Seen or held-out, about one composition in five held out."""
        a, b = _object_index(self.first), _object_index(self.second)
        r = list(Relation).index(self.relation)
        return Split.HELDOUT if (7 * a + 3 * b + r) % 5 == 0 else Split.SEEN


Scene = SingleScene | PairScene


def _object_index(obj: ObjectSpec) -> int:
    return list(Color).index(obj.color) * len(Shape) + list(Shape).index(obj.shape)


def all_single_scenes(split: Split | None = None) -> list[SingleScene]:
    """Every single-object composition, optionally only those of one split."""
    scenes = [SingleScene(ObjectSpec(c, s), p) for c, s, p in product(Color, Shape, Position)]
    return [x for x in scenes if split is None or x.split == split]


def all_pair_scenes(split: Split | None = None) -> list[PairScene]:
    """Every two-object composition (two different colours), optionally of one split."""
    objs = [ObjectSpec(c, s) for c, s in product(Color, Shape)]
    scenes = [PairScene(a, r, b) for a, r, b in product(objs, Relation, objs) if a.color != b.color]
    return [x for x in scenes if split is None or x.split == split]


_OBJ = r"an? (?P<{0}c>\w+) (?P<{0}s>\w+)"
_SINGLE_RE = re.compile("^" + _OBJ.format("a") + r" (?P<pos>" + "|".join(POSITION_PHRASES.values()) + ")$")
_PAIR_RE = re.compile(
    "^" + _OBJ.format("a") + r" (?P<rel>" + "|".join(r.value for r in Relation) + ") " + _OBJ.format("b") + "$"
)


def parse_prompt(prompt: str) -> Scene:
    """Parse a caption of the shapes grammar back into its scene.

    Args:
        prompt: e.g. ``"a red circle on the left"`` or ``"a red circle above a blue square"``.
            Case and surrounding whitespace are ignored.

    Raises:
        ValueError: the prompt is not in the grammar; the message shows the two valid forms.
    """
    text = " ".join(prompt.lower().split())
    try:
        if m := _SINGLE_RE.match(text):
            pos = {v: k for k, v in POSITION_PHRASES.items()}[m["pos"]]
            return SingleScene(ObjectSpec(Color(m["ac"]), Shape(m["as"])), pos)
        if m := _PAIR_RE.match(text):
            return PairScene(
                ObjectSpec(Color(m["ac"]), Shape(m["as"])),
                Relation(m["rel"]),
                ObjectSpec(Color(m["bc"]), Shape(m["bs"])),
            )
    except ValueError as exc:
        raise ValueError(f"prompt {prompt!r} is outside the shapes grammar: {exc}") from None
    raise ValueError(
        f"prompt {prompt!r} is outside the shapes grammar; expected 'a COLOR SHAPE POSITION' "
        f"or 'a COLOR SHAPE RELATION a COLOR SHAPE' with COLOR in {[c.value for c in Color]}, "
        f"SHAPE in {[s.value for s in Shape]}, POSITION in {list(POSITION_PHRASES.values())}, "
        f"RELATION in {[r.value for r in Relation]}"
    )


def draw_object(draw: ImageDraw.ImageDraw, obj: ObjectSpec, cx: float, cy: float, size: float) -> None:
    """Draw ``obj`` centred at (cx, cy) with bounding-box side ``size`` (canvas pixels) onto a
    ``_SUPERSAMPLE``-times larger drawing (shared by the image and the video renderers)."""
    k = _SUPERSAMPLE
    h = size / 2.0
    box = [(cx - h) * k, (cy - h) * k, (cx + h) * k, (cy + h) * k]
    fill = COLOR_RGB[obj.color]
    if obj.shape is Shape.CIRCLE:
        draw.ellipse(box, fill=fill)
    elif obj.shape is Shape.SQUARE:
        draw.rectangle(box, fill=fill)
    else:
        draw.polygon([(cx * k, box[1]), (box[0], box[3]), (box[2], box[3])], fill=fill)


def _layout(scene: Scene, rng: np.random.Generator) -> list[tuple[ObjectSpec, float, float, float]]:
    """(object, cx, cy, size) for each object, with seeded jitter."""
    if isinstance(scene, SingleScene):
        ax, ay = POSITION_ANCHORS[scene.position]
        jx, jy = rng.uniform(-_SINGLE_JITTER, _SINGLE_JITTER, size=2)
        return [(scene.obj, ax + jx, ay + jy, rng.uniform(*_SINGLE_SIZE))]
    near, far = rng.uniform(*_PAIR_NEAR), rng.uniform(*_PAIR_FAR)
    across = rng.uniform(*_PAIR_CROSS, size=2)
    first_near = scene.relation in (Relation.LEFT_OF, Relation.ABOVE)
    along = (near, far) if first_near else (far, near)
    horizontal = scene.relation in (Relation.LEFT_OF, Relation.RIGHT_OF)
    out = []
    for obj, a, c in zip(scene.objects, along, across, strict=True):
        x, y = (a, c) if horizontal else (c, a)
        out.append((obj, float(x), float(y), rng.uniform(*_PAIR_SIZE)))
    return out


def render(scene: Scene, seed: int | np.random.Generator) -> Image.Image:
    """Render a scene as an RGB image of ``IMAGE_SIZE`` pixels, deterministic for a seed.

    Args:
        scene: what to draw.
        seed: an int seed or a numpy Generator for the size and placement jitter.
    """
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    big = IMAGE_SIZE * _SUPERSAMPLE
    img = Image.new("RGB", (big, big), BACKGROUND_RGB)
    draw = ImageDraw.Draw(img)
    for obj, cx, cy, size in _layout(scene, rng):
        draw_object(draw, obj, cx, cy, size)
    return img.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BOX)


def sample_training_scene(rng: np.random.Generator, pair_fraction: float = 0.5) -> Scene:
    """Draw a random scene from the *seen* compositions only.

    Args:
        rng: numpy Generator.
        pair_fraction: probability of a two-object scene. Default 0.5.
    """
    pool: list[Scene]
    pool = _SEEN_PAIRS if rng.random() < pair_fraction else _SEEN_SINGLES  # type: ignore[assignment]
    return pool[int(rng.integers(len(pool)))]


_SEEN_SINGLES: list[SingleScene] = all_single_scenes(Split.SEEN)
_SEEN_PAIRS: list[PairScene] = all_pair_scenes(Split.SEEN)


def eval_scenes(prompt_set: PromptSet, n: int, seed: int = 0) -> list[Scene]:
    """A deterministic evaluation list of ``n`` scenes, covering the set's compositions evenly.

    Args:
        prompt_set: single (seen compositions), single_heldout, or pairs (seen compositions).
        n: number of scenes; compositions repeat once all have been used.
        seed: shuffles the order of compositions. Default 0.
    """
    if n <= 0:
        raise ValueError(f"n must be positive, got {n}")
    pool: list[Scene]
    if prompt_set is PromptSet.SINGLE:
        pool = list(_SEEN_SINGLES)
    elif prompt_set is PromptSet.SINGLE_HELDOUT:
        pool = list(all_single_scenes(Split.HELDOUT))
    else:
        pool = list(_SEEN_PAIRS)
    return cycled(pool, n, seed)


def cycled(pool: Sequence[T], n: int, seed: int) -> list[T]:
    """``n`` items of ``pool``, every item once (in a seeded order) before any repeats."""
    rng = np.random.default_rng(seed)
    out: list[T] = []
    while len(out) < n:
        order = rng.permutation(len(pool))
        out.extend(pool[i] for i in order[: n - len(out)])
    return out
