"""The bundle's denoiser against the FP one, call by call, on the FP sampler's own inputs."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from diffkiln.calibrate import batch_kwargs, source_for
from diffkiln.core.hooks import recording_calls
from diffkiln.core.metrics import sqnr_db

HELD_OUT_PROMPT = "a green tree beside a small house"
"""A prompt no calibration set holds."""


def _flat(out: Any) -> torch.Tensor:
    """A denoiser's output as one tensor (Z-Image returns a list, one tensor per sample)."""
    return torch.cat([t.flatten() for t in out]) if isinstance(out, (list, tuple)) else out


def per_call_sqnr(
    fp: Any,
    q: Any,
    call: Mapping[str, Any],
    steps: int = 2,
    seed: int = 7,
    component: str = "transformer",
    output: int = 0,
) -> list[float]:
    """Per-call SQNR (dB, rounded to 0.1) of ``q``'s ``component`` against ``fp``'s, on every call of
    it in an FP run of ``steps`` steps on the held-out prompt with ``call``'s arguments; of the
    call's ``output``-th output (LTX-2's 1: its audio prediction)."""
    source = source_for(fp, [HELD_OUT_PROMPT], 1)
    fp.set_progress_bar_config(disable=True)
    fp_model, q_model = getattr(fp, component), getattr(q, component)
    with recording_calls("test.record", fp_model) as calls, torch.no_grad():
        # own_media: one image as it is (Wan image-to-video takes no list of images)
        fp(**batch_kwargs(fp, [source.sample(0)], own_media=True), **call, num_inference_steps=steps,
           output_type="latent", generator=torch.Generator().manual_seed(seed))  # fmt: skip
    assert calls, f"the run never called the {component}"
    values = []
    for args, kwargs in calls:
        with torch.no_grad():
            ref = _flat(fp_model(*args, **{**kwargs, "return_dict": False})[output])
            got = _flat(q_model(*args, **{**kwargs, "return_dict": False})[output])
        values.append(round(sqnr_db(ref, got), 1))
    return values
