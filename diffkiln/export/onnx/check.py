"""A dynamic ONNX graph is declared dynamic only after it ran at a second shape.

``torch.export`` may accept dynamic axes and still produce a graph that fails in onnxruntime at
another shape (a broadcast or reshape it specialised). So after exporting the denoiser with
dynamic axes, the exporter records a second sampler call at another batch and (when the
pipeline takes a size) another resolution, runs the graph on it in onnxruntime and compares the
result with the same modules in torch. A graph that fails or disagrees is exported again with the
recorded shapes, and the manifest says why.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from diffkiln.calibrate.dataflow import bind_call
from diffkiln.calibrate.sources import batch_kwargs, pipeline_call_hints, source_for, source_from_description
from diffkiln.core.arguments import feed_array, flatten_arguments
from diffkiln.core.errors import DiffkilnError
from diffkiln.core.hooks import scoped_hooks
from diffkiln.core.metrics import sqnr_db
from diffkiln.core.pipelines import accepted_call_kwargs, call_parameters
from diffkiln.core.plan import calibration_record

__all__ = [
    "MIN_CHECK_SQNR_DB",
    "bundle_call",
    "capture_call",
    "flatten_call",
    "recorded_components",
    "run_check",
    "second_shape",
]

log = logging.getLogger(__name__)

MIN_CHECK_SQNR_DB = 20.0
"""The least SQNR of the graph's output against torch at the second shape (the same QDQ
arithmetic: measured 35-60 dB; a wrong broadcast or stale positional table gives 0 dB or less)."""


def bundle_call(
    pipe: Any, manifest: Mapping[str, Any], prompt: str, batch: int = 1, overrides: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """A short pipeline call (2 steps, decoded output) on the bundle's own kind of input.

    The inputs come from the bundle's recorded calibration source (its first samples), else from
    the pipeline's signature with ``prompt``; the call arguments are those it was calibrated with,
    then ``overrides``.
    """
    calibration = calibration_record(manifest)
    given = {**dict(calibration.get("call_kwargs", {})), **dict(overrides or {})}
    try:  # never the user's image files a bundle names: they are outside it
        source = source_from_description(calibration["source"])
    except (KeyError, ValueError):
        source = source_for(pipe, [prompt], batch, call_kwargs=given)
    samples = [source.sample(i % len(source)) for i in range(batch)]
    defaults: dict[str, Any] = {"num_inference_steps": 2, "output_type": "np"}
    if calibration.get("guidance") is not None:
        defaults["guidance_scale"] = calibration["guidance"]
    return {
        # One sample's image as it is: some pipelines take no list of images (Wan image-to-video).
        **batch_kwargs(pipe, samples, own_media=True),
        **accepted_call_kwargs(pipe, defaults),
        **accepted_call_kwargs(pipe, given, strict=True),
        # One generator for one sample, not a list of one (VideoToVideoSD encodes one frame per listed generator).
        "generator": [torch.Generator().manual_seed(i) for i in range(batch)] if batch > 1
        else torch.Generator().manual_seed(0),
    }


def recorded_components(pipe: Any, manifest: Mapping[str, Any], prompt: str, denoiser_only: bool) -> list[Any]:
    """The components of one short call of the bundle's pipeline (:func:`bundle_call`), recorded
    (:func:`~diffkiln.export.onnx.components.record_components`): the denoiser first, then its
    quantized experts (a bundle's ``experts``).

    With ``denoiser_only`` the call stops at the latents where the pipeline allows it: nothing is
    decoded that is not exported (Allegro's VAE decodes only in tiles). A failure of the pipeline's
    own code is one line naming the component that raised.
    """
    from diffkiln.export.onnx.components import record_components

    call = bundle_call(pipe, manifest, prompt)
    denoiser, experts = manifest["pipeline"]["denoiser"], sorted(manifest.get("experts") or {})
    with pipeline_call_hints(pipe, [call], int(call.get("num_inference_steps", 2)), call):
        if denoiser_only and "output_type" in call:
            try:
                return record_components(pipe, denoiser, {**call, "output_type": "latent"}, experts)
            except DiffkilnError:  # the recorded call cannot be exported: decoding would not change that
                raise
            except Exception:  # the pipeline's own failure without decoding (no latent output): decoded
                log.debug("%s: no latent output; recording the decoded call", type(pipe).__name__)
        return record_components(pipe, denoiser, call, experts)


class _Captured(Exception):
    def __init__(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        super().__init__("captured")
        self.args, self.kwargs = args, kwargs


def capture_call(
    pipe: Any, denoiser: nn.Module, call: Mapping[str, Any], matches: Callable[..., bool] | None = None
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """The inputs of the denoiser's first call in ``pipe(**call)`` (the pipeline stops there), or
    its first call for which ``matches(args, kwargs)`` holds (a call form's:
    :func:`~diffkiln.export.onnx.components.call_matcher`).

    Raises:
        RuntimeError: the call never reached the denoiser (or no call matched).
    """

    def stop(_m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if matches is None or matches(args, kwargs):
            raise _Captured(args, dict(kwargs))

    with scoped_hooks() as hooks, torch.no_grad():
        hooks.add_forward_pre_hook("diffkiln.onnx.capture", denoiser, stop)
        try:
            pipe.set_progress_bar_config(disable=True)
            pipe(**call)
        except _Captured as cap:
            return cap.args, cap.kwargs
    raise RuntimeError("the pipeline call never reached the denoiser" + ("" if matches is None else " in this form"))


def _default_size(pipe: Any, manifest: Mapping[str, Any]) -> int | None:
    """The pipeline's default output size in pixels, by diffusers' convention: ``default_sample_size``
    (or the denoiser config's ``sample_size``) times ``vae_scale_factor``; None where either is missing."""
    denoiser = getattr(pipe, manifest.get("pipeline", {}).get("denoiser", ""), None)
    latent = getattr(pipe, "default_sample_size", None) or getattr(
        getattr(denoiser, "config", None), "sample_size", None
    )
    factor = getattr(pipe, "vae_scale_factor", None)
    return latent * factor if isinstance(latent, int) and isinstance(factor, int) else None


def second_shape(pipe: Any, manifest: Mapping[str, Any], given: Mapping[str, Any]) -> dict[str, Any]:
    """The call arguments of the check's second shape: ``given`` when set, else twice the
    recorded height and width (or the pipeline's default size) where the pipeline takes both
    (diffusers' standard size arguments)."""
    if given:
        return dict(given)
    recorded = dict(calibration_record(manifest).get("call_kwargs", {}))
    params = call_parameters(pipe)
    default = _default_size(pipe, manifest)
    height, width = recorded.get("height", default), recorded.get("width", default)
    if "height" in params and "width" in params and isinstance(height, int) and isinstance(width, int):
        return {"height": 2 * height, "width": 2 * width}
    return {}


def run_check(
    path: Path, names: list[str], module: nn.Module, tensors: Mapping[str, torch.Tensor], outputs: int = 1
) -> dict[str, Any]:
    """Run the graph at ``path`` on ``tensors`` and compare its first ``outputs`` outputs (a
    denoiser's predictions: :func:`~diffkiln.export.onnx.components.compared_outputs`) with
    ``module`` (the export wrapper) in torch.

    Returns:
        ``{"ok": bool, "shapes": {input: shape}, "sqnr_db": float | None, "error": str | None}``,
        the SQNR the least over the compared outputs.
    """
    import onnxruntime as ort

    shapes = {k: list(v.shape) for k, v in tensors.items()}
    if set(tensors) != set(names):
        missing = sorted(set(names) ^ set(tensors))
        return {"ok": False, "shapes": shapes, "sqnr_db": None, "error": f"the inputs differ: {missing}"}
    try:
        options = ort.SessionOptions()
        options.log_severity_level = 3
        # The graph as written, as the onnxruntime backend runs it by default.
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        got = session.run(None, {s.name: feed_array(tensors[s.name], s.type) for s in session.get_inputs()})
    except Exception as exc:  # onnxruntime raises its own exception types for failed runs
        return {"ok": False, "shapes": shapes, "sqnr_db": None, "error": f"{type(exc).__name__}: {str(exc)[:300]}"}
    with torch.no_grad():
        ref = module(*(tensors[n] for n in names))
    refs = list(ref) if isinstance(ref, (tuple, list)) else [ref]
    if len(got) < outputs or len(refs) < outputs:
        return {"ok": False, "shapes": shapes, "sqnr_db": None,
                "error": f"{len(got)} graph outputs, {len(refs)} in torch; {outputs} compared"}  # fmt: skip
    worst = float("inf")
    for i in range(outputs):
        ref_np, out = refs[i].detach().float().numpy(), np.asarray(got[i])
        if ref_np.shape != out.shape:
            return {"ok": False, "shapes": shapes, "sqnr_db": None,
                    "error": f"output {i}: {out.shape}, torch {ref_np.shape}"}  # fmt: skip
        if not np.isfinite(out).all():
            return {"ok": False, "shapes": shapes, "sqnr_db": None, "error": f"output {i} is not finite"}
        worst = min(worst, float(sqnr_db(ref_np, out)))
    ok = worst >= MIN_CHECK_SQNR_DB
    which = "" if outputs == 1 else f" (the least of {outputs} outputs)"
    error = None if ok else f"SQNR {worst:.1f} dB against torch{which}, below {MIN_CHECK_SQNR_DB} dB"
    return {"ok": ok, "shapes": shapes, "sqnr_db": round(min(worst, 999.0), 2), "error": error}


def flatten_call(module: nn.Module, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """A captured call's tensors as the export names its graph inputs."""
    return flatten_arguments(bind_call(module, args, kwargs))[0]
