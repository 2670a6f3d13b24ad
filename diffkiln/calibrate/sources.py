"""Where a pipeline's per-sample inputs come from: prompts, images, class labels, or nothing.

Calibration and the report call a pipeline with whatever it takes, found from its ``__call__``
signature: a text-to-image or text-to-audio pipeline gets prompts; an image-to-video pipeline
(whose ``image`` has no default) gets seeded synthetic images (and prompts too, if it takes them);
a class-conditional one gets class labels; an unconditional one gets nothing but a batch size.
A source is pluggable: any object with ``kind``, ``describe()`` and ``sample(i)`` works, e.g. a
user's own images.

Every sample ``i`` is deterministic: the same source gives the same inputs in calibration, in the
mixed recipe's trials and in reports.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from diffkiln.core.errors import InvalidInputError
from diffkiln.core.pipelines import call_parameters

__all__ = [
    "CallSource",
    "ClassLabelSource",
    "ImageSource",
    "PromptSource",
    "UnconditionalSource",
    "batch_kwargs",
    "source_for",
    "source_from_description",
]


class CallSource(Protocol):
    """Per-sample pipeline-call arguments."""

    @property
    def kind(self) -> str:
        """A short name, e.g. ``"prompt"``."""

    def __len__(self) -> int:
        """How many samples."""

    def sample(self, index: int) -> dict[str, Any]:
        """Sample ``index``'s own arguments, e.g. ``{"prompt": "..."}``."""

    def describe(self) -> dict[str, Any]:
        """JSON-ready settings that determine every sample (part of cache keys and plan notes)."""


@dataclass(frozen=True)
class PromptSource:
    """Text prompts (and, for image-conditioned pipelines that also take text, synthetic images)."""

    prompts: tuple[str, ...]
    images: ImageSource | None = None
    kind: str = "prompt"

    def __post_init__(self) -> None:
        if not self.prompts or any(not p.strip() for p in self.prompts):
            raise InvalidInputError("a prompt source needs at least one prompt, and no empty prompt")

    def __len__(self) -> int:
        return len(self.prompts)

    def sample(self, index: int) -> dict[str, Any]:
        out: dict[str, Any] = {"prompt": self.prompts[index]}
        if self.images is not None:
            out.update(self.images.sample(index))
        return out

    def describe(self) -> dict[str, Any]:
        images = self.images.describe() if self.images else None
        return {"kind": self.kind, "prompts": list(self.prompts), "images": images}


@dataclass(frozen=True)
class ImageSource:
    """Seeded synthetic RGB images (soft colour fields with a few shapes), for image-conditioned
    pipelines. Users with their own images pass a source of their own."""

    count: int
    seed: int = 0
    height: int = 64
    width: int = 64
    kind: str = "image"

    def __len__(self) -> int:
        return self.count

    def sample(self, index: int) -> dict[str, Any]:
        from PIL import Image

        rng = np.random.default_rng(self.seed * 100_003 + index)
        h, w = self.height, self.width
        yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
        base = rng.uniform(0, 1, 3)[None, None] + rng.uniform(-0.5, 0.5, 3)[None, None] * (yy + xx)[..., None]
        img = np.clip(base, 0, 1)
        for _ in range(int(rng.integers(1, 4))):
            cy, cx, r = rng.uniform(0, h), rng.uniform(0, w), rng.uniform(0.1, 0.3) * min(h, w)
            mask = (np.mgrid[0:h, 0:w][0] - cy) ** 2 + (np.mgrid[0:h, 0:w][1] - cx) ** 2 < r * r
            img[mask] = rng.uniform(0, 1, 3)
        return {"image": Image.fromarray((img * 255).astype(np.uint8))}

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "count": self.count, "seed": self.seed, "height": self.height, "width": self.width}


@dataclass(frozen=True)
class ClassLabelSource:
    """Class labels ``(seed * 7919 + i) % classes`` for class-conditional pipelines."""

    count: int
    classes: int = 1000
    seed: int = 0
    kind: str = "class_labels"

    def __len__(self) -> int:
        return self.count

    def sample(self, index: int) -> dict[str, Any]:
        return {"class_labels": (self.seed * 7919 + index * 37) % self.classes}

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "count": self.count, "classes": self.classes, "seed": self.seed}


@dataclass(frozen=True)
class UnconditionalSource:
    """No per-sample input: unconditional pipelines differ only by their seeds."""

    count: int
    kind: str = "unconditional"

    def __len__(self) -> int:
        return self.count

    def sample(self, index: int) -> dict[str, Any]:
        return {}

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "count": self.count}


def _required(params: dict[str, inspect.Parameter], name: str) -> bool:
    p = params.get(name)
    return p is not None and p.default is inspect.Parameter.empty


def source_for(pipe: Any, prompts: Sequence[str], count: int, seed: int = 0, size: tuple[int, int] = (64, 64)) -> Any:
    """The source a pipeline takes, from its ``__call__`` signature.

    Args:
        pipe: the pipeline.
        prompts: prompts for pipelines that take text (repeated or cut to ``count``).
        count: how many samples.
        seed: seed of synthetic images and class labels. Default 0.
        size: (height, width) of synthetic images. Default (64, 64).

    Raises:
        InvalidInputError: ``count`` is not positive, or a text pipeline gets no prompt.
    """
    if count <= 0:
        raise InvalidInputError(f"the number of samples must be positive, got {count}")
    params = call_parameters(pipe)
    images = ImageSource(count, seed, *size) if "image" in params and (_required(params, "image")) else None
    if "prompt" in params:
        if not prompts:
            raise InvalidInputError(f"{type(pipe).__name__} takes prompts; give at least one")
        chosen = tuple(prompts[i % len(prompts)] for i in range(count))
        return PromptSource(chosen, images)
    if images is not None:
        return images
    if "class_labels" in params:
        id2label = getattr(pipe, "labels", None) or getattr(getattr(pipe, "config", None), "id2label", None)
        classes = len(id2label) if id2label else 1000
        return ClassLabelSource(count, classes, seed)
    return UnconditionalSource(count)


def batch_kwargs(pipe: Any, samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """One pipeline call's arguments for several samples: each argument as a list, or, for a
    pipeline without per-sample inputs, its batch size."""
    if not samples or not samples[0]:
        params = call_parameters(pipe)
        return {"batch_size": len(samples)} if "batch_size" in params else {}
    return {k: [s[k] for s in samples] for k in samples[0]}


def source_from_description(d: dict[str, Any]) -> Any:
    """Re-create a built-in source from its :meth:`CallSource.describe` output (recorded in
    calibration statistics).

    Raises:
        InvalidInputError: a source kind diffkiln does not define (a user's own source must be
            passed again).
    """
    kind = d.get("kind")
    if kind == "prompt":
        images = source_from_description(d["images"]) if d.get("images") else None
        return PromptSource(tuple(d["prompts"]), images)
    if kind == "image":
        return ImageSource(int(d["count"]), int(d["seed"]), int(d["height"]), int(d["width"]))
    if kind == "class_labels":
        return ClassLabelSource(int(d["count"]), int(d["classes"]), int(d["seed"]))
    if kind == "unconditional":
        return UnconditionalSource(int(d["count"]))
    raise InvalidInputError(f"cannot re-create an input source of kind {kind!r}; pass the source object again")
