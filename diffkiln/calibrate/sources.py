"""Where a pipeline's per-sample inputs come from: prompts, images (and masks), clips, class labels,
or nothing.

Calibration and the report call a pipeline with whatever it takes, found from its ``__call__``
signature: a text-to-image or text-to-audio pipeline gets prompts; a pipeline that transforms or
animates an image (its ``image`` has no default, or it also takes a ``strength`` or a ``mask_image``:
image-to-video, image-to-image, inpainting) gets seeded synthetic images, with masks where it takes
them, and one that transforms a clip (``video`` with no default, or with a ``strength``) seeded
synthetic clips (and prompts too, if it takes them); a class-conditional one gets class labels; an
unconditional one gets nothing but a batch size.
A source is pluggable: any object with ``kind``, ``describe()`` and ``sample(i)`` works, e.g. a
user's own images.

Every sample ``i`` is deterministic: the same source gives the same inputs in calibration, in the
mixed recipe's trials and in reports.
"""

from __future__ import annotations

import contextlib
import inspect
import weakref
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NoReturn, Protocol

from diffkiln.calibrate.call_failures import pipeline_failure
from diffkiln.calibrate.media_sources import (
    FileImageSource,
    FileVideoSource,
    ImageSource,
    InputFiles,
    MediaSource,
    VideoSource,
)
from diffkiln.core.errors import DiffkilnError, InvalidInputError
from diffkiln.core.pipelines import call_parameters, denoiser_candidates

__all__ = [
    "MEDIA_ARGUMENTS",
    "CallSource",
    "ClassLabelSource",
    "FileImageSource",
    "FileVideoSource",
    "ImageSource",
    "InputFiles",
    "PromptSource",
    "UnconditionalSource",
    "VideoSource",
    "batch_kwargs",
    "image_size",
    "pipeline_call_hints",
    "remember_one_input_per_call",
    "source_for",
    "source_from_description",
    "takes_images",
    "takes_one_input_per_call",
    "takes_video",
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
    """Text prompts (and, for pipelines that start from an image or a clip and also take text, those)."""

    prompts: tuple[str, ...]
    images: MediaSource | None = None
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


def takes_images(params: dict[str, inspect.Parameter]) -> bool:
    """Whether a pipeline call with these parameters needs an input image: its ``image`` has no
    default, or the call also takes what only an input image gives meaning to (a ``strength`` of
    the change to it, or a ``mask_image`` over it)."""
    return "image" in params and (_required(params, "image") or "strength" in params or "mask_image" in params)


def takes_video(params: dict[str, inspect.Parameter]) -> bool:
    """Whether a pipeline call with these parameters needs an input clip: its ``video`` has no
    default, or comes with a ``strength`` of the change to it (video-to-video)."""
    return "video" in params and (_required(params, "video") or "strength" in params)


def image_size(pipe: Any, call_kwargs: Mapping[str, Any] | None = None) -> tuple[int, int]:
    """(height, width) of synthetic input images: the call's ``height`` and ``width`` where given,
    else the pipeline's own default output size (its default sample size times its VAE's scale
    factor, as diffusers pipelines compute it), else 64 x 64.

    An image-to-image pipeline without ``height``/``width`` arguments works at its input image's
    size, so a real checkpoint is calibrated at the size it was trained at.
    """
    kw = call_kwargs or {}
    if kw.get("height") is not None and kw.get("width") is not None:
        return int(kw["height"]), int(kw["width"])
    factor = getattr(pipe, "vae_scale_factor", None)
    sample = getattr(pipe, "default_sample_size", None)
    if not isinstance(sample, int):
        sizes = [getattr(getattr(m, "config", None), "sample_size", None) for m in denoiser_candidates(pipe).values()]
        sample = next((s for s in sizes if isinstance(s, int)), None)
    if isinstance(factor, int) and isinstance(sample, int):
        return sample * factor, sample * factor
    return 64, 64


def source_for(
    pipe: Any,
    prompts: Sequence[str],
    count: int,
    seed: int = 0,
    call_kwargs: Mapping[str, Any] | None = None,
    inputs: InputFiles | None = None,
) -> Any:
    """The source a pipeline takes, from its ``__call__`` signature.

    Args:
        pipe: the pipeline.
        prompts: prompts for pipelines that take text (repeated or cut to ``count``).
        count: how many samples.
        seed: seed of synthetic images, clips, masks and class labels. Default 0.
        call_kwargs: the calls' own arguments: synthetic images and clips come at
            :func:`image_size`, clips with ``num_frames`` frames where given (else 9). Default none.
        inputs: the user's own input files (:class:`FileImageSource`, :class:`FileVideoSource`);
            none: synthetic images or clips where the pipeline needs them (:func:`takes_images`,
            :func:`takes_video`). Default None.

    Raises:
        InvalidInputError: ``count`` is not positive, a text pipeline gets no prompt, or the
            files do not fit the pipeline (it takes no image, mask, control image or clip, it needs
            a mask or a control image and none is given, a file is missing or no image, or more
            files than samples).
    """
    if count <= 0:
        raise InvalidInputError(f"the number of samples must be positive, got {count}")
    params = call_parameters(pipe)
    size = image_size(pipe, call_kwargs)
    image_source: MediaSource | None = None
    if inputs:
        image_source = _file_source(type(pipe).__name__, params, count, inputs)
    elif takes_video(params):
        frames = int((call_kwargs or {}).get("num_frames") or 9)
        image_source = VideoSource(count, seed, *size, frames=frames)
    elif takes_images(params):
        image_source = ImageSource(count, seed, *size, masks="mask_image" in params)
    if "prompt" in params:
        if not prompts:
            raise InvalidInputError(f"{type(pipe).__name__} takes prompts; give at least one")
        chosen = tuple(prompts[i % len(prompts)] for i in range(count))
        return PromptSource(chosen, image_source)
    if image_source is not None:
        return image_source
    if "class_labels" in params:
        id2label = getattr(pipe, "labels", None) or getattr(getattr(pipe, "config", None), "id2label", None)
        classes = len(id2label) if id2label else 1000
        return ClassLabelSource(count, classes, seed)
    return UnconditionalSource(count)


def _file_source(name: str, params: dict[str, inspect.Parameter], count: int, inputs: InputFiles) -> MediaSource:
    if inputs.videos:
        if "video" not in params:
            raise InvalidInputError(f"{name} takes no input clip; leave out the clips (--video, --calib-video)")
        if inputs.images or inputs.masks or inputs.controls:
            raise InvalidInputError("give either clips or images, not both")
        return FileVideoSource(count, inputs.videos)
    refused = [(inputs.images, "image", "input image", "image files (--image, --calib-image)"),
               (inputs.masks, "mask_image", "mask", "mask files (--mask-image, --calib-mask-image)"),
               (inputs.controls, "control_image", "control image",
                "control image files (--control-image, --calib-control-image)")]  # fmt: skip
    for given, param, what, flags in refused:
        if given and param not in params:
            raise InvalidInputError(f"{name} takes no {what}; leave out the {flags}")
    if not inputs.images:
        raise InvalidInputError(
            "a mask or a control image needs the image it goes with; give the image files "
            "(--image or --calib-image FILE) too"
        )
    if "mask_image" in params and not inputs.masks:
        raise InvalidInputError(
            f"{name} repaints under a mask: give a mask file too (--mask-image or --calib-mask-image FILE: "
            "white repaints, black keeps)"
        )
    if "control_image" in params and not inputs.controls:
        raise InvalidInputError(
            f"{name} is steered by a control image: give a control image file too (--control-image or "
            "--calib-control-image FILE)"
        )
    return FileImageSource(count, inputs.images, inputs.masks, inputs.controls)


@contextlib.contextmanager
def pipeline_call_hints(
    pipe: Any, samples: Sequence[dict[str, Any]], steps: int, call_kwargs: Mapping[str, Any]
) -> Iterator[None]:
    """Around a pipeline call on ``samples`` with ``steps`` steps and ``call_kwargs``: a failure
    with a cause the signature cannot rule out beforehand is re-raised naming it and the fix:

    * an ``image`` (or ``control_image``) the pipeline takes and none of the samples holds (a
      ControlNet's control image, an edit's reference: nothing in the signature says one is needed);
    * a ``strength`` (image-to-image) that leaves fewer than one of the steps to run (diffusers
      starts at step ``steps - int(steps * strength)``, and fails on an empty schedule).

    Any other failure in the pipeline's own code is named with the component that raised
    (:func:`~diffkiln.calibrate.call_failures.pipeline_failure`); one in diffkiln's code stays as it is.

    Raises:
        InvalidInputError: one of the failures above, with the pipeline's own message and the fix.
        PipelineCallError: another failure in the pipeline's own code.
    """
    try:
        yield
    except Exception as exc:
        if isinstance(exc, DiffkilnError) or not isinstance(exc, _HINTED):
            _raise_named(pipe, exc, call_kwargs, len(samples))
        name, params = type(pipe).__name__, call_parameters(pipe)
        strength = call_kwargs.get("strength", params["strength"].default if "strength" in params else None)
        if isinstance(strength, int | float) and steps * strength < 1:
            raise InvalidInputError(
                f"{name} failed ({exc}): at strength {strength}, {steps} steps leave none to run; give more "
                "steps (--steps) or a higher strength (--call-arg strength=...)"
            ) from exc
        missing = [k for k in ("image", "control_image") if k in params and not any(k in s for s in samples)]
        if missing and not isinstance(exc, RuntimeError):
            fix = (
                "if it needs one (a control, reference or starting image), give it: --calib-image FILE to "
                "optimize, --image FILE to generate"
                if missing[0] == "image"
                else "diffkiln makes up no control image: give it with --calib-control-image FILE to optimize, "
                "--control-image FILE to generate"
            )
            raise InvalidInputError(f"{name} failed without an input {missing[0]} ({exc}); {fix}") from exc
        _raise_named(pipe, exc, call_kwargs, len(samples))


_HINTED = (TypeError, ValueError, AttributeError, RuntimeError, IndexError)
"""The failure types a missing input or an empty schedule raise in diffusers."""


def _raise_named(pipe: Any, exc: Exception, call_kwargs: Mapping[str, Any], samples: int) -> NoReturn:
    failure = pipeline_failure(pipe, exc, call_kwargs, samples)
    if failure is None:
        raise exc
    raise failure from exc


MEDIA_ARGUMENTS = ("image", "video", "mask_image", "control_image")
"""The per-sample call arguments that hold an input image or clip."""

_ONE_PER_CALL: weakref.WeakSet[Any] = weakref.WeakSet()


def takes_one_input_per_call(pipe: Any) -> bool:
    """Whether ``pipe`` was found to take one input image or clip per call, not a list
    (:func:`diffkiln.calibrate.pipeline_calls.call_pipeline` finds it, and records it here)."""
    try:
        return pipe in _ONE_PER_CALL
    except TypeError:  # not weak-referenceable: never recorded
        return False


def remember_one_input_per_call(pipe: Any) -> None:
    """Record that ``pipe`` takes one input image or clip per call (:func:`takes_one_input_per_call`)."""
    with contextlib.suppress(TypeError):  # not weak-referenceable: its calls keep trying lists first
        _ONE_PER_CALL.add(pipe)


def batch_kwargs(pipe: Any, samples: Sequence[dict[str, Any]], own_media: bool = False) -> dict[str, Any]:
    """One pipeline call's arguments for several samples: each argument as a list, or, for a
    pipeline without per-sample inputs, its batch size. With ``own_media``, one sample's images and
    clips as they are, not lists of one (a pipeline that takes one input per call refuses those)."""
    if not samples or not samples[0]:
        params = call_parameters(pipe)
        return {"batch_size": len(samples)} if "batch_size" in params else {}
    if len(samples) == 1 and own_media:
        return {k: v if k in MEDIA_ARGUMENTS else [v] for k, v in samples[0].items()}
    return {k: [s[k] for s in samples] for k in samples[0]}


def source_from_description(d: dict[str, Any], files: bool = False) -> Any:
    """Re-create a built-in source from its :meth:`CallSource.describe` output (recorded in
    calibration statistics).

    Args:
        d: the description.
        files: re-open the files a :class:`FileImageSource` or :class:`FileVideoSource` names.
            Only for descriptions this machine's calibration wrote (its statistics); a bundle is
            untrusted input, and the paths its record names are outside it. Default False.

    Raises:
        InvalidInputError: a source kind diffkiln does not define (a user's own source must be
            passed again), the user's files without ``files``, or files that changed.
    """
    kind = d.get("kind")
    if kind == "prompt":
        images = source_from_description(d["images"], files) if d.get("images") else None
        return PromptSource(tuple(d["prompts"]), images)
    if kind == "image":
        size = int(d["height"]), int(d["width"])
        return ImageSource(int(d["count"]), int(d["seed"]), *size, masks=bool(d.get("masks")))
    if kind == "video":
        size = int(d["height"]), int(d["width"])
        return VideoSource(int(d["count"]), int(d["seed"]), *size, frames=int(d["frames"]))
    if kind in ("image_files", "video_files"):
        if not files:
            raise InvalidInputError("the record names the user's own files, which are not re-opened from it")
        count = int(d["count"])
        source: FileImageSource | FileVideoSource = (
            FileVideoSource(count, tuple(d["clips"]))
            if kind == "video_files"
            else FileImageSource(count, tuple(d["images"]), tuple(d["masks"]), tuple(d["controls"]))
        )
        if source.describe()["sha256"] != d.get("sha256"):
            named = [p for key in ("images", "masks", "controls", "clips") for p in d.get(key, ())]
            raise InvalidInputError(f"the files {named} changed since they were recorded")
        return source
    if kind == "class_labels":
        return ClassLabelSource(int(d["count"]), int(d["classes"]), int(d["seed"]))
    if kind == "unconditional":
        return UnconditionalSource(int(d["count"]))
    raise InvalidInputError(f"cannot re-create an input source of kind {kind!r}; pass the source object again")
