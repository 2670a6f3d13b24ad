"""The closed vocabulary of the built-in "shapes" world: colors, shapes, positions, relations.

Everything else in :mod:`diffkiln.zoo.shapes` (rendering, prompts, the judge, the tokenizer of
the built-in models) is derived from these tables, so there is one place to change them.
"""

from __future__ import annotations

from enum import Enum

__all__ = [
    "BACKGROUND_RGB",
    "COLOR_RGB",
    "IMAGE_SIZE",
    "POSITION_ANCHORS",
    "POSITION_PHRASES",
    "RELATION_PHRASES",
    "Color",
    "Position",
    "Relation",
    "Shape",
    "prompt_words",
]

IMAGE_SIZE = 64
"""Side of the rendered images, in pixels."""

BACKGROUND_RGB = (0, 0, 0)
"""Background colour; black keeps anti-aliased edges on the line from an object's colour to zero."""


class Color(str, Enum):
    """Object colours. Chosen far apart in chromaticity so the judge separates them reliably."""

    RED = "red"
    GREEN = "green"
    BLUE = "blue"
    YELLOW = "yellow"


class Shape(str, Enum):
    """Object shapes; the triangle points up."""

    CIRCLE = "circle"
    SQUARE = "square"
    TRIANGLE = "triangle"


class Position(str, Enum):
    """Where a single object sits in the image."""

    LEFT = "left"
    RIGHT = "right"
    TOP = "top"
    BOTTOM = "bottom"
    CENTER = "center"


class Relation(str, Enum):
    """How the first object of a two-object scene sits relative to the second."""

    LEFT_OF = "left of"
    RIGHT_OF = "right of"
    ABOVE = "above"
    BELOW = "below"


COLOR_RGB: dict[Color, tuple[int, int, int]] = {
    Color.RED: (220, 40, 40),
    Color.GREEN: (40, 190, 60),
    Color.BLUE: (50, 90, 230),
    Color.YELLOW: (230, 210, 40),
}

POSITION_ANCHORS: dict[Position, tuple[float, float]] = {
    Position.LEFT: (16.0, 32.0),
    Position.RIGHT: (48.0, 32.0),
    Position.TOP: (32.0, 16.0),
    Position.BOTTOM: (32.0, 48.0),
    Position.CENTER: (32.0, 32.0),
}
"""(x, y) centre of each single-object position on the 64x64 canvas."""

POSITION_PHRASES: dict[Position, str] = {
    Position.LEFT: "on the left",
    Position.RIGHT: "on the right",
    Position.TOP: "at the top",
    Position.BOTTOM: "at the bottom",
    Position.CENTER: "in the center",
}

RELATION_PHRASES: dict[Relation, str] = {r: r.value for r in Relation}


def prompt_words() -> list[str]:
    """Every word that can occur in a prompt of the shapes world (sorted, unique)."""
    words = {"a", "an"}
    for phrase in [c.value for c in Color] + [s.value for s in Shape]:
        words.update(phrase.split())
    for phrase in list(POSITION_PHRASES.values()) + list(RELATION_PHRASES.values()):
        words.update(phrase.split())
    return sorted(words)
