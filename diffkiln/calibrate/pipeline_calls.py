"""Calling a pipeline on several samples: one call with each per-sample argument as a list, or,
for a pipeline that takes one input image or clip per call, one call per sample.

Some pipelines refuse a list where others batch it: ``WanImageToVideoPipeline`` checks that
``image`` is one tensor or PIL image. Nothing in the signature says so (it annotates the argument
with diffusers' union that includes lists), so the
call with an image or a clip is tried with them as lists; where it fails, the first sample fails
in a list of one too, and runs with its own arguments (one image, not a list of one), the
pipeline is remembered as taking one per call, and the rest of the samples are called one by
one, their outputs joined along the batch.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from diffkiln.calibrate.sources import (
    MEDIA_ARGUMENTS,
    batch_kwargs,
    remember_one_input_per_call,
    takes_one_input_per_call,
)

__all__ = ["call_pipeline", "joined_output"]

log = logging.getLogger(__name__)


def call_pipeline(pipe: Any, samples: Sequence[dict[str, Any]], generators: Sequence[torch.Generator],
                  kwargs: dict[str, Any], before_each: Callable[[int], None] | None = None) -> Any:  # fmt: skip
    """``pipe`` called on ``samples`` (per-sample arguments as lists, :func:`batch_kwargs`), with
    one generator per sample and ``kwargs``; for a pipeline that takes one input image or clip per
    call, one call per sample and the outputs joined (:func:`joined_output`).

    Args:
        pipe: the pipeline.
        samples: the per-sample arguments.
        generators: one per sample.
        kwargs: the other call arguments.
        before_each: called with the number of samples before each pipeline call (a step
            callback's bookkeeping: progress, the last step's latents).
    """

    def run(part: Sequence[dict[str, Any]], gens: Sequence[torch.Generator]) -> Any:
        if before_each is not None:
            before_each(len(part))
        return pipe(**batch_kwargs(pipe, part), generator=list(gens), **kwargs)

    def one(sample: dict[str, Any], gen: torch.Generator) -> Any:
        # The sample's arguments as they are: a list of one image is a list all the same.
        if before_each is not None:
            before_each(1)
        return pipe(**sample, generator=gen, **kwargs)

    if not samples or not any(k in samples[0] for k in MEDIA_ARGUMENTS):
        return run(samples, generators)
    if not takes_one_input_per_call(pipe):
        try:
            return run(samples, generators)
        except Exception as exc:
            # The list is the cause only where the first sample fails in a list of one and runs
            # with its own arguments (an image-to-image call at a strength that leaves no step
            # fails with two samples and runs with one, listed or not: its failure stands).
            if len(samples) > 1:  # (one sample: that call is the one that just failed)
                try:
                    run(samples[:1], generators[:1])
                except Exception:
                    pass
                else:
                    raise exc from None
            # Its own failure, if the sample fails this way too (or a hook's stop: calibration
            # stops a call at the denoiser's first step); remembered only once it ran.
            first = one(samples[0], generators[0])
            remember_one_input_per_call(pipe)
            log.info("%s takes one input per call (%s): calling it once per sample", type(pipe).__name__, exc)
            rest = [one(s, g) for s, g in zip(samples[1:], generators[1:], strict=True)]
            return joined_output([first, *rest])
    return joined_output([one(s, g) for s, g in zip(samples, generators, strict=True)])


def _join(values: list[Any]) -> Any:
    first = values[0]
    if isinstance(first, torch.Tensor):
        return torch.cat(values)
    if isinstance(first, np.ndarray):
        return np.concatenate(values)
    if isinstance(first, list):
        return [x for v in values for x in v]
    return first  # not per sample (None, a flag): the first call's


def joined_output(outputs: list[Any]) -> Any:
    """Pipeline outputs of calls on consecutive samples as one output: each field (a diffusers
    ``BaseOutput``'s, or a tuple's items) joined along the batch (tensors and arrays concatenated,
    lists chained)."""
    first = outputs[0]
    if len(outputs) == 1:
        return first
    if isinstance(first, tuple):
        return tuple(_join([o[i] for o in outputs]) for i in range(len(first)))
    # A BaseOutput is a dataclass whose None fields are not among its keys: its fields, by name.
    names = [f.name for f in dataclasses.fields(first)] if dataclasses.is_dataclass(first) else list(first)
    return type(first)(**{k: _join([getattr(o, k, None) if dataclasses.is_dataclass(o) else o[k] for o in outputs])
                          for k in names})  # fmt: skip
