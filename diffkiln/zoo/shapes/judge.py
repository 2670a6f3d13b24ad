"""The content judge: does an image show what its shapes-world prompt asks for?

Our stand-in for CLIP score on the built-in models. For each colour it segments the pixels of
that colour (by chromaticity, so anti-aliased edges against the black background keep their
colour), keeps the largest connected blob, classifies its shape by the best intersection-over-
union with a circle, square and triangle fitted to the blob's bounding box, and reads the
position from the bounding-box centre. A prompt is judged correct only when every object's
colour, shape and position (or the pair's relation) are right and no extra object is present.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

from diffkiln.zoo.shapes.dataset import Scene, SingleScene, parse_prompt
from diffkiln.zoo.shapes.vocab import (
    COLOR_RGB,
    IMAGE_SIZE,
    POSITION_ANCHORS,
    Color,
    Position,
    Relation,
    Shape,
)

__all__ = ["Blob", "ObjectVerdict", "Verdict", "content_accuracy", "detect", "judge", "nearest_position"]

_MIN_BRIGHTNESS = 90.0  # a pixel whose brightest channel is below this is background
_MIN_AREA = 20  # blobs smaller than this many pixels are noise, not objects
_PALETTE = list(COLOR_RGB)
_CHROMA = np.array([np.array(COLOR_RGB[c], float) / sum(COLOR_RGB[c]) for c in _PALETTE])


@dataclass(frozen=True)
class Blob:
    """A detected object: its colour, its classified shape and its bounding-box centre."""

    color: Color
    shape: Shape
    cx: float
    cy: float
    area: int
    shape_iou: float


@dataclass(frozen=True)
class ObjectVerdict:
    """Per-attribute verdict for one object of the prompt."""

    color_ok: bool
    shape_ok: bool
    position_ok: bool


@dataclass(frozen=True)
class Verdict:
    """The judge's decision on one (image, prompt)."""

    prompt: str
    objects: tuple[ObjectVerdict, ...]
    extra_objects: int
    blobs: tuple[Blob, ...]

    @property
    def correct(self) -> bool:
        """True when every attribute of every object is right and nothing extra is drawn."""
        ok = all(o.color_ok and o.shape_ok and o.position_ok for o in self.objects)
        return ok and self.extra_objects == 0

    @property
    def reason(self) -> str:
        """A short human-readable account of what was wrong ("" when correct)."""
        parts = []
        for i, o in enumerate(self.objects):
            bad = [n for n, ok in (("color", o.color_ok), ("shape", o.shape_ok), ("position", o.position_ok)) if not ok]
            if bad:
                parts.append(f"object {i + 1}: wrong {'/'.join(bad)}")
        if self.extra_objects:
            parts.append(f"{self.extra_objects} extra object(s)")
        return "; ".join(parts)


def _to_array(image: Image.Image | np.ndarray) -> np.ndarray:
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"expected an HxWx3 RGB array, got shape {image.shape}")
        image = Image.fromarray(image.astype(np.uint8))
    image = image.convert("RGB")
    if image.size != (IMAGE_SIZE, IMAGE_SIZE):
        image = image.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BOX)
    return np.asarray(image, dtype=np.float64)


def _largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 4-connected component of a boolean mask (iterative flood fill)."""
    h, w = mask.shape
    seen = np.zeros_like(mask)
    best: list[tuple[int, int]] = []
    for y0, x0 in zip(*np.nonzero(mask), strict=True):
        if seen[y0, x0]:
            continue
        stack, comp = [(int(y0), int(x0))], []
        seen[y0, x0] = True
        while stack:
            y, x = stack.pop()
            comp.append((y, x))
            for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    stack.append((ny, nx))
        if len(comp) > len(best):
            best = comp
    out = np.zeros_like(mask)
    if best:
        ys, xs = zip(*best, strict=True)
        out[list(ys), list(xs)] = True
    return out


def _shape_templates(h: int, w: int) -> dict[Shape, np.ndarray]:
    v, u = np.mgrid[0:h, 0:w]
    u = (u + 0.5) / w
    v = (v + 0.5) / h
    return {
        Shape.CIRCLE: (u - 0.5) ** 2 + (v - 0.5) ** 2 <= 0.25,
        Shape.SQUARE: np.ones((h, w), bool),
        Shape.TRIANGLE: np.abs(u - 0.5) <= v / 2 + 0.5 / w,
    }


def _classify_shape(blob: np.ndarray) -> tuple[Shape, float, float, float]:
    ys, xs = np.nonzero(blob)
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    crop = blob[y0:y1, x0:x1]
    ious = {}
    for shape, tpl in _shape_templates(y1 - y0, x1 - x0).items():
        ious[shape] = float((crop & tpl).sum() / max((crop | tpl).sum(), 1))
    shape = max(ious, key=lambda s: ious[s])
    return shape, ious[shape], (x0 + x1) / 2.0, (y0 + y1) / 2.0


def detect(image: Image.Image | np.ndarray) -> list[Blob]:
    """Find the objects in an image: at most one blob per colour, largest first.

    Args:
        image: a PIL image or HxWx3 uint8 array; resized to the shapes canvas if needed.
    """
    rgb = _to_array(image)
    foreground = rgb.max(axis=2) >= _MIN_BRIGHTNESS
    chroma = rgb / np.maximum(rgb.sum(axis=2, keepdims=True), 1.0)
    nearest = np.argmin(((chroma[:, :, None, :] - _CHROMA[None, None]) ** 2).sum(-1), axis=2)
    blobs = []
    for i, color in enumerate(_PALETTE):
        comp = _largest_component(foreground & (nearest == i))
        area = int(comp.sum())
        if area < _MIN_AREA:
            continue
        shape, iou, cx, cy = _classify_shape(comp)
        blobs.append(Blob(color, shape, cx, cy, area, iou))
    return sorted(blobs, key=lambda b: -b.area)


def nearest_position(blob: Blob) -> Position:
    """The named position whose anchor is nearest the blob's centre."""
    return _position_of(blob)


def _position_of(blob: Blob) -> Position:
    return min(
        POSITION_ANCHORS,
        key=lambda p: (POSITION_ANCHORS[p][0] - blob.cx) ** 2 + (POSITION_ANCHORS[p][1] - blob.cy) ** 2,
    )


def _relation_of(first: Blob, second: Blob) -> Relation:
    dx, dy = first.cx - second.cx, first.cy - second.cy
    if abs(dx) >= abs(dy):
        return Relation.LEFT_OF if dx < 0 else Relation.RIGHT_OF
    return Relation.ABOVE if dy < 0 else Relation.BELOW


def judge(image: Image.Image | np.ndarray, prompt: str | Scene) -> Verdict:
    """Judge whether ``image`` shows ``prompt``.

    Args:
        image: the generated (or rendered) image.
        prompt: a shapes-world caption, or an already parsed scene.

    Raises:
        ValueError: the prompt is outside the shapes grammar.
    """
    scene = parse_prompt(prompt) if isinstance(prompt, str) else prompt
    blobs = {b.color: b for b in detect(image)}
    found = [blobs.get(o.color) for o in scene.objects]
    extra = len(set(blobs) - {o.color for o in scene.objects})
    verdicts: tuple[ObjectVerdict, ...]
    if isinstance(scene, SingleScene):
        b = found[0]
        verdicts = (
            ObjectVerdict(
                color_ok=b is not None,
                shape_ok=b is not None and b.shape == scene.obj.shape,
                position_ok=b is not None and _position_of(b) == scene.position,
            ),
        )
    else:
        a, b = found
        rel_ok = a is not None and b is not None and _relation_of(a, b) == scene.relation
        verdicts = tuple(
            ObjectVerdict(
                color_ok=blob is not None,
                shape_ok=blob is not None and blob.shape == obj.shape,
                position_ok=rel_ok,
            )
            for blob, obj in zip(found, scene.objects, strict=True)
        )
    return Verdict(scene.prompt, verdicts, extra, tuple(blobs.values()))


def content_accuracy(images: Sequence[Image.Image | np.ndarray], prompts: Sequence[str | Scene]) -> float:
    """Fraction of (image, prompt) pairs the judge finds entirely correct.

    Args:
        images: generated images.
        prompts: their prompts, same length.
    """
    # Imported here: diffkiln.report imports this package, so a top-level import would be circular.
    from diffkiln.core import metrics

    if len(images) != len(prompts):
        raise ValueError(f"{len(images)} images but {len(prompts)} prompts; pass one prompt per image")
    return metrics.content_accuracy([judge(i, p).correct for i, p in zip(images, prompts, strict=True)])
