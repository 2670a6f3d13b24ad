"""A denoiser's ONNX graph, exported and checked: with dynamic axes where a run of the graph at a
second shape (another batch and size of the bundle's own call) matches the torch model, else at
the recorded shapes, run once by onnxruntime before it is written (:func:`checked_denoiser`)."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import torch

from diffkiln.core.arguments import bind_call, is_int_argument
from diffkiln.core.pipelines import call_parameters
from diffkiln.core.schema import LoadedBundle
from diffkiln.export.onnx.check import bundle_call, capture_call, run_check, second_shape
from diffkiln.export.onnx.components import Component, call_matcher, compared_outputs, flatten_kwargs, with_int_inputs
from diffkiln.export.onnx.config import OnnxExportConfig
from diffkiln.export.onnx.modules import OnnxExportError
from diffkiln.export.onnx.program import export_component
from diffkiln.export.onnx.write import error_summary

__all__ = ["DYNAMIC_ATTEMPTS", "checked_denoiser", "varied_axes", "verified_entry"]

_PER_PROMPT = ("num_videos_per_prompt", "num_images_per_prompt", "num_waveforms_per_prompt")
"""diffusers' call arguments that make several samples of one prompt (and one input image)."""

log = logging.getLogger(__name__)


def checked_denoiser(
    component: Component, file: Path, config: OnnxExportConfig, names: set[str], bundle: LoadedBundle,
    first: str | None = None,
) -> tuple[dict[str, Any], Component, dict[str, torch.Tensor] | None]:
    """Export the denoiser (or an expert of its class); a graph exported with dynamic axes is run at
    another shape first (:mod:`diffkiln.export.onnx.check`). The exports of :data:`DYNAMIC_ATTEMPTS` in order, until one
    passes (``first``, the attempt that passed for another graph of the same model, before the
    others; the entry's ``check`` names the one that passed); then the recorded shapes.

    Returns:
        (the manifest entry, the component as exported (its int inputs, traced example), the
        inputs of the check's other call; None for a static graph)."""
    failures: list[str] = []
    calls: dict[bool, tuple[Component, dict[str, torch.Tensor]] | str] = {}
    # The attempt that passed for another graph of the same model first (a call form's variant).
    attempts = sorted(DYNAMIC_ATTEMPTS, key=lambda a: a[0] != first)
    for attempt, swapped, batch_only, varied_only in attempts if config.dynamic else ():
        if batch_only not in calls:
            calls[batch_only] = _second_call(component, config, bundle, batch_only)
        second = calls[batch_only]
        if isinstance(second, str):  # the pipeline does not run there, or fixes that size in the graph
            failures.append(f"{attempt}: {second}")
            continue
        base, tensors = second
        traced, checked = (tensors, base.example) if swapped else (base.example, tensors)
        exported = dataclasses.replace(base, example=traced)
        varied = varied_axes(base, tensors) if varied_only else None
        try:
            entry = export_component(exported, file, config, names, batch_only=batch_only, fallback=False,
                                     varied=varied)  # fmt: skip
            _check_int_inputs(entry, base.int_inputs)
        except OnnxExportError as exc:  # a refusal of diffkiln's own holds at any shape
            raise OnnxExportError(_not_exported(component, str(exc))) from None
        except Exception as exc:  # torch.export raises many types; the reason goes to the manifest
            failures.append(f"{attempt}: {type(exc).__name__}: {error_summary(exc)}")
            continue
        check = (run_check(file, list(base.example), base.module, checked, compared_outputs(base))
                 if entry["dynamic"] else None)  # fmt: skip
        if check is not None and check["ok"]:
            return verified_entry(entry, exported, checked, {**check, "attempt": attempt}, failures), exported, checked
        failures.append(f"{attempt}: {check['error'] if check else 'no axis stayed dynamic'}")
        log.warning("%s: %s", component.name, failures[-1])
    try:
        static = export_component(component, file, dataclasses.replace(config, dynamic=False), names)
    except Exception as exc:  # torch.export and torch.onnx raise many types
        raise OnnxExportError(_not_exported(component, f"{type(exc).__name__}: {error_summary(exc)}")) from None
    # Run once at the recorded call: a graph onnxruntime cannot load or run is refused, not written.
    check = run_check(file, list(component.example), component.module, component.example, compared_outputs(component))
    if not check["ok"]:
        raise OnnxExportError(_not_exported(component, f"onnxruntime at the recorded call: {check['error']}"))
    reason = "; ".join(failures) or "dynamic axes not requested"
    return {**static, "static_reason": reason, "check": check}, component, None


def _not_exported(component: Component, reason: str) -> str:
    """The one-line refusal of a denoiser that has no ONNX graph."""
    children = list(component.module.children())  # the export wrapper holds the model
    model = type(children[0] if len(children) == 1 else component.module).__name__
    return (f"the {component.name} ({model}) does not export to ONNX: {reason}; the bundle itself runs in the "
            "torch runtime (diffkiln generate BUNDLE, load_pipeline)")  # fmt: skip


DYNAMIC_ATTEMPTS = (
    ("every axis dynamic", False, False, False),
    ("every axis dynamic, traced at the second shape", True, False, False),
    ("the axes the second shape varies dynamic", False, False, True),
    ("the batch axis dynamic", False, True, False),
)
"""The dynamic exports of the denoiser, tried in order: (what, traced at the second shape and
checked at the recorded call, batch axis only, only the axes the second shape varies). The others
are traced at the recorded call and checked at the second shape (another batch and, but for the
batch-only one, another size).

Only the varied axes: an axis of fixed size the model splits and squeezes (LTX-2's patch
coordinates, ``[start, end)`` in a last axis of 2, halved by ``chunk(2)`` and squeezed) traced
as a symbol gave a graph whose ranks onnxruntime found wrong at another size; left at its size,
the latent and text axes around it stay dynamic.

Tracing at the second shape is for a model that takes a shortcut at the size it was configured
for: PixArt's patch embedding adds its stored position table where ``height == sample_size`` and
computes one from the input's size elsewhere. A trace at the configured size records the table as
a constant, and the graph fails at every other size; a trace at another size records the general
path, and the check at the recorded call proves it gives the stored table's result there."""


def _second_call(
    component: Component, config: OnnxExportConfig, bundle: LoadedBundle, batch_only: bool
) -> tuple[Component, dict[str, torch.Tensor]] | str:
    """The component to export and its input tensors in the bundle's call at batch 2 and, unless
    ``batch_only``, the second size (:func:`~diffkiln.export.onnx.check.second_shape`); or why there
    is none: the call failed, or it changes options the graph would fix.

    Int options that change at the second size (LTX's latent ``height``, ``width`` and
    ``num_frames``) become graph inputs (:func:`~diffkiln.export.onnx.components.with_int_inputs`);
    any other changed option (a string, a float, a bool) cannot, and neither can an int in a batch-only
    attempt, whose graph is to take the recorded size only."""
    pipe, manifest = bundle.pipeline, bundle.manifest
    model = getattr(pipe, component.name)  # the denoiser, or an expert of its class
    overrides = {} if batch_only else second_shape(pipe, manifest, dict(config.check_call_kwargs))
    recorded = set(component.example) - set(component.int_inputs)
    # Two samples; else one sample made twice (a pipeline that takes one image per call, as Wan
    # image-to-video, refuses two: diffusers' per-prompt count still doubles the batch); else one.
    per_prompt = next((p for p in _PER_PROMPT if p in call_parameters(pipe)), None)
    attempts = [(2, {}), *([(1, {per_prompt: 2})] if per_prompt else []), (1, {})]
    found: tuple[dict[str, torch.Tensor], dict[str, Any]] | None = None
    failed = ""
    for batch, twice in attempts:
        try:
            call = bundle_call(pipe, manifest, config.prompt, batch=batch, overrides={**overrides, **twice})
            args, kwargs = capture_call(pipe, model, call, call_matcher(component, model))
            if twice:  # the model must take what the pipeline made (diffusers' Wan 2.1 image-to-video
                with torch.no_grad():  # repeats the text, not its image tokens, per video)
                    model(*args, **kwargs)
            found = flatten_kwargs(bind_call(model, args, kwargs))
        except Exception as exc:  # a pipeline raises its own types at a size it does not take
            failed = failed or f"{type(exc).__name__}: {exc}"
            continue
        # A denoiser taking per-sample lists (Z-Image) has an input per sample: another batch
        # is another graph, so the second shape keeps the recorded batch and varies the size.
        if set(found[0]) == recorded or batch_only:
            break
    if found is None:
        return f"the call at a second shape failed: {failed}"[:400]
    tensors, options = found
    changed = {k: (component.options.get(k), options.get(k)) for k in {*options, *component.options}
               if options.get(k) != component.options.get(k)}  # fmt: skip
    if not changed:
        return component, tensors
    ints = not batch_only and all(is_int_argument(v) for pair in changed.values() for v in pair)
    promoted = with_int_inputs(component, sorted(changed)) if ints else None
    if promoted is None:
        return f"the graph fixes options that change at the second shape (recorded, second): {changed}"
    return promoted, {**tensors, **{k: torch.tensor(options[k], dtype=torch.int64) for k in promoted.int_inputs}}


def _check_int_inputs(entry: dict[str, Any], int_inputs: tuple[str, ...]) -> None:
    """Raise where the graph does not take every int input: torch.export fixed it to the traced value."""
    fixed = sorted(set(int_inputs) - {i["name"] for i in entry["inputs"]})
    if fixed:
        raise ValueError(f"the trace fixed the int arguments {fixed} to their traced values")


def varied_axes(component: Component, tensors: dict[str, Any]) -> dict[str, list[int]]:
    """Per input, the axes whose size differs between the recorded call and ``tensors``."""
    return {
        n: [a for a, (x, y) in enumerate(zip(component.example[n].shape, tensors[n].shape, strict=True)) if x != y]
        for n in component.example
    }


def verified_entry(
    entry: dict[str, Any], component: Component, tensors: dict[str, Any], check: dict[str, Any], failures: list[str]
) -> dict[str, Any]:
    """The entry with only the symbolic axes the check really varied declared dynamic (the others
    listed as unverified), and the check's result."""
    varied = varied_axes(component, tensors)
    dynamic = {n: [a for a in axes if a in varied.get(n, [])] for n, axes in entry["dynamic_axes"].items()}
    unverified = {n: [a for a in axes if a not in dynamic[n]] for n, axes in entry["dynamic_axes"].items()}
    out = {**entry, "dynamic_axes": dynamic, "dynamic": any(dynamic.values()), "check": check,
           "unverified_axes": {n: a for n, a in unverified.items() if a}}  # fmt: skip
    if failures:
        out["wider_axes_failed"] = failures
    return out
