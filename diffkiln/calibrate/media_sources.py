"""Input images, masks and clips for pipelines that start from them: seeded synthetic ones, or
the user's own files (the per-sample sources of :mod:`diffkiln.calibrate.sources`)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from diffkiln.core.errors import InvalidInputError

__all__ = ["FileImageSource", "FileVideoSource", "ImageSource", "InputFiles", "MediaSource", "VideoSource"]


@dataclass(frozen=True)
class InputFiles:
    """The user's own per-sample input files, each list taken in turn (at most one per sample):
    what a pipeline that starts from an image or a clip starts from. Empty: seeded synthetic
    images and clips where the pipeline needs them."""

    images: tuple[str, ...] = ()
    """Input images (image-to-image, inpainting, image-to-video; a ControlNet's control image)."""
    masks: tuple[str, ...] = ()
    """Inpainting masks, white where the pipeline repaints, with ``images``."""
    controls: tuple[str, ...] = ()
    """Control images of a ControlNet image-to-image or inpainting call (``control_image``), with ``images``."""
    videos: tuple[str, ...] = ()
    """Input clips of a video-to-video call: animated GIF/WebP/APNG files or folders of frames."""

    @classmethod
    def of(cls, images: Any = (), masks: Any = (), controls: Any = (), videos: Any = ()) -> InputFiles:
        """From any sequences of paths (``str`` or ``Path``)."""
        return cls(*(tuple(map(str, paths)) for paths in (images, masks, controls, videos)))

    def __bool__(self) -> bool:
        return any((self.images, self.masks, self.controls, self.videos))

    def to_dict(self) -> dict[str, list[str]]:
        """The lists given, by field (JSON-ready; a record and a cache key's input)."""
        return {k: list(v) for k, v in (("images", self.images), ("masks", self.masks),
                                         ("controls", self.controls), ("videos", self.videos)) if v}  # fmt: skip


@dataclass(frozen=True)
class ImageSource:
    """Seeded synthetic RGB images (soft colour fields with a few shapes), for image-conditioned
    pipelines, and for inpainting pipelines a mask each. Users with their own images pass a source
    of their own."""

    count: int
    """How many samples."""
    seed: int = 0
    """Seed of the images and masks."""
    height: int = 64
    """Image height in pixels."""
    width: int = 64
    """Image width in pixels."""
    kind: str = "image"
    """The source's kind, recorded in its description."""
    masks: bool = False
    """Also give each sample a ``mask_image``: a white (repaint) ellipse or rectangle on black,
    covering from about an eighth to two thirds of the image."""

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
        out: dict[str, Any] = {"image": Image.fromarray((img * 255).astype(np.uint8))}
        if self.masks:  # drawn after the image, so the images are those of a source without masks
            out["mask_image"] = Image.fromarray(_repaint_mask(rng, h, w))  # uint8 (h, w): mode L
        return out

    def describe(self) -> dict[str, Any]:
        d = {"kind": self.kind, "count": self.count, "seed": self.seed, "height": self.height, "width": self.width}
        # Only where set: the descriptions (and calibration cache keys) of mask-free sources stay as they were.
        return {**d, "masks": True} if self.masks else d


@dataclass(frozen=True)
class FileImageSource:
    """A user's own input images, and their inpainting masks or ControlNet control images, read from files.

    Sample ``i`` takes image ``i`` (and mask ``i``), cycling through the files when there are
    fewer than samples. Every file is checked when the source is made; its description records
    each file's sha256, so a calibration cache or a bundle's record follows the files' contents.
    """

    count: int
    """How many samples."""
    images: tuple[str, ...]
    """Image files (RGB is taken): at most one per sample, cycled."""
    masks: tuple[str, ...] = ()
    """Mask files, read as greyscale (white repaints, black keeps): at most one per sample, cycled."""
    controls: tuple[str, ...] = ()
    """Control image files (``control_image``, RGB): at most one per sample, cycled."""
    kind: str = "image_files"
    """The source's kind, recorded in its description."""

    def __post_init__(self) -> None:
        if not self.images:
            raise InvalidInputError("no input image given; give an image file for the pipeline to start from")
        for what, paths in (("image", self.images), ("mask", self.masks), ("control image", self.controls)):
            if len(paths) > self.count:
                raise InvalidInputError(
                    f"{len(paths)} {what} files for {self.count} samples; give at most one {what} per sample "
                    f"(they are taken in turn), or more samples"
                )
            for path in paths:
                _open_image(path, what).close()

    def __len__(self) -> int:
        return self.count

    def sample(self, index: int) -> dict[str, Any]:
        out: dict[str, Any] = {"image": _read(self.images, index, "image", "RGB")}
        if self.masks:
            out["mask_image"] = _read(self.masks, index, "mask", "L")
        if self.controls:
            out["control_image"] = _read(self.controls, index, "control image", "RGB")
        return out

    def describe(self) -> dict[str, Any]:
        files = (*self.images, *self.masks, *self.controls)
        digests = [hashlib.sha256(Path(p).read_bytes()).hexdigest() for p in files]
        return {"kind": self.kind, "count": self.count, "images": list(self.images), "masks": list(self.masks),
                "controls": list(self.controls), "sha256": digests}  # fmt: skip


@dataclass(frozen=True)
class FileVideoSource:
    """A user's own input clips for video-to-video pipelines, read from files: each an animated
    image (GIF, WebP, APNG) or a folder of frames (image files, in name order).

    Sample ``i`` takes clip ``i``, cycling through them when there are fewer than samples. Every
    clip is read when the source is made; its description records each clip's sha256 (of its
    frame files, for a folder).
    """

    count: int
    """How many samples."""
    clips: tuple[str, ...]
    """Clip files or frame folders: at most one per sample, cycled."""
    kind: str = "video_files"
    """The source's kind, recorded in its description."""

    def __post_init__(self) -> None:
        if not self.clips:
            raise InvalidInputError("no input clip given; give a clip for the pipeline to start from")
        if len(self.clips) > self.count:
            raise InvalidInputError(
                f"{len(self.clips)} clips for {self.count} samples; give at most one clip per sample "
                "(they are taken in turn), or more samples"
            )
        for clip in self.clips:
            _clip_frames(clip)

    def __len__(self) -> int:
        return self.count

    def sample(self, index: int) -> dict[str, Any]:
        return {"video": _clip_frames(self.clips[index % len(self.clips)])}

    def describe(self) -> dict[str, Any]:
        digests = []
        for clip in self.clips:
            files = _frame_files(clip) if Path(clip).is_dir() else [Path(clip)]
            digests.append(hashlib.sha256(b"".join(hashlib.sha256(f.read_bytes()).digest() for f in files)).hexdigest())
        return {"kind": self.kind, "count": self.count, "clips": list(self.clips), "sha256": digests}


def _frame_files(folder: str) -> list[Path]:
    return sorted(p for p in Path(folder).iterdir() if p.is_file() and not p.name.startswith("."))


def _clip_frames(clip: str) -> list[Any]:
    """A clip's frames as RGB images, or InvalidInputError naming what is wrong."""
    from PIL import ImageSequence

    if Path(clip).is_dir():
        files = _frame_files(clip)
        if not files:
            raise InvalidInputError(f"clip folder {clip!r} holds no frame; give a folder of image files")
        return [_read((str(f),), 0, "frame", "RGB") for f in files]
    with _open_image(clip, "clip") as image:
        return [frame.convert("RGB") for frame in ImageSequence.Iterator(image)]


def _open_image(path: str, what: str) -> Any:
    """The opened image file, or InvalidInputError naming it."""
    from PIL import Image, UnidentifiedImageError

    if not Path(path).is_file():
        raise InvalidInputError(f"{what} file {path!r} does not exist; give an image file (PNG, JPEG, GIF, ...)")
    try:
        image = Image.open(path)
        image.load()
    except (UnidentifiedImageError, OSError) as exc:
        raise InvalidInputError(
            f"{what} file {path!r} is not a readable image ({exc}); give a PNG, JPEG, ..."
        ) from None
    return image


def _read(paths: tuple[str, ...], index: int, what: str, mode: str) -> Any:
    with _open_image(paths[index % len(paths)], what) as image:
        return image.convert(mode)


def _repaint_mask(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """A uint8 (h, w) mask, 255 where the pipeline repaints: an ellipse or a rectangle."""
    cy, cx = rng.uniform(0.3, 0.7) * h, rng.uniform(0.3, 0.7) * w
    ry, rx = rng.uniform(0.2, 0.4) * h, rng.uniform(0.2, 0.4) * w
    yy, xx = np.mgrid[0:h, 0:w]
    if rng.uniform() < 0.5:
        inside = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 < 1
    else:
        inside = (np.abs(yy - cy) < ry) & (np.abs(xx - cx) < rx)
    return np.where(inside, 255, 0).astype(np.uint8)


@dataclass(frozen=True)
class VideoSource:
    """Seeded synthetic clips for video-to-video pipelines: an :class:`ImageSource` image whose
    content slides sideways by a few pixels per frame, so consecutive frames differ as motion."""

    count: int
    """How many samples."""
    seed: int = 0
    """Seed of the clips."""
    height: int = 64
    """Frame height in pixels."""
    width: int = 64
    """Frame width in pixels."""
    frames: int = 9
    """Frames per clip (9 fits the 4k+1 and 8k+1 frame counts of the causal video VAEs)."""
    kind: str = "video"
    """The source's kind, recorded in its description."""

    def __len__(self) -> int:
        return self.count

    def sample(self, index: int) -> dict[str, Any]:
        from PIL import Image

        first = np.asarray(ImageSource(self.count, self.seed, self.height, self.width).sample(index)["image"])
        step = max(1, self.width // 16)
        return {"video": [Image.fromarray(np.roll(first, t * step, axis=1)) for t in range(self.frames)]}

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "count": self.count, "seed": self.seed, "height": self.height,
                "width": self.width, "frames": self.frames}  # fmt: skip


MediaSource = ImageSource | FileImageSource | VideoSource | FileVideoSource
"""What a :class:`~diffkiln.calibrate.sources.PromptSource` adds to each prompt's sample."""
