"""The ``export --format onnx`` verb: a bundle as one ONNX model per component, plus what the
onnxruntime backend needs to run the pipeline.

Loads the bundle with the runtime (verified, no FP weights needed), records every model
component's inputs from one short sampler call (:mod:`diffkiln.export.onnx.components`), swaps
each quantized denoiser layer for its export stand-in (:mod:`diffkiln.export.onnx.modules`) and
exports with ``torch.onnx.export(dynamo=True)`` and the custom-op translations of
:mod:`diffkiln.export.onnx.ops`. The graphs then go through the onnx-ir passes of
:mod:`diffkiln.export.onnx.passes` and ``onnx.checker.check_model(full_check=True)``.

The output folder holds ``denoiser.onnx``, ``<text encoder>.onnx``, ``vae_decoder.onnx`` (and
``vae_encoder.onnx`` where the pipeline's call encoded an image), the pipeline's tokenizers,
scheduler and component configs (no weights; a component's own top-level tensors, such as LTX's
VAE ``latents_mean``, in ``<component>/own_tensors.safetensors``), and ``manifest.json`` (format
``diffkiln.onnx``; files with sizes and sha256), written atomically (nothing half-written).
A bundle's cache schedule goes with it: a ``whole`` schedule runs on ``denoiser.onnx``; a block-range
one adds ``denoiser_cached.onnx`` (:mod:`diffkiln.export.onnx.cache_graphs`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from diffkiln.core.arguments import bind_call, is_int_argument
from diffkiln.core.atomic import atomic_directory, file_table
from diffkiln.core.cache_schedule import CacheMechanism, CacheSchedule
from diffkiln.core.errors import BundleError
from diffkiln.core.plan import calibration_record
from diffkiln.core.schema import MANIFEST_NAME, ONNX_FORMAT, ONNX_VERSION, LoadedBundle
from diffkiln.export.onnx.cache_graphs import (
    CACHED_FILE,
    CacheFillDenoiser,
    check_reuse,
    fill_component,
    reuse_component,
    reuse_inputs,
    schedule_entry,
)
from diffkiln.export.onnx.check import bundle_call, capture_call, recorded_components, run_check, second_shape
from diffkiln.export.onnx.components import (
    Component,
    ComponentKind,
    _Denoiser,
    batch_inputs,
    flatten_kwargs,
    with_int_inputs,
)
from diffkiln.export.onnx.config import MAX_OPSET, MIN_OPSET, OnnxCompute, OnnxExportConfig
from diffkiln.export.onnx.modules import OnnxExportError, OnnxQLinear, export_module_for
from diffkiln.export.onnx.program import export_component
from diffkiln.export.onnx.write import error_summary, save_own_tensors
from diffkiln.nn import QConv, QLinear
from diffkiln.nn.cache import CacheStepTracer

__all__ = [
    "MAX_OPSET",
    "MIN_OPSET",
    "ONNX_FORMAT",
    "ONNX_VERSION",
    "OnnxCompute",
    "OnnxExportConfig",
    "export_denoiser_onnx",
    "export_module_onnx",
    "export_onnx",
]

log = logging.getLogger(__name__)

_VAE_FILES = {ComponentKind.VAE_DECODER: "vae_decoder.onnx", ComponentKind.VAE_ENCODER: "vae_encoder.onnx"}


def _swap_quantized_layers(
    denoiser: nn.Module, keep_fp: bool, integer: bool = False, matmulnbits: bool = False
) -> tuple[set[str], dict[str, str]]:
    """Replace every runtime Q-module by its export stand-in; return the INT4 weight initializer
    names and the layers kept in float (name -> reason)."""

    sub_byte: set[str] = set()
    kept: dict[str, str] = {}
    for layer, module in list(denoiser.named_modules()):
        if not isinstance(module, (QLinear, QConv)):
            continue
        try:
            stand_in = export_module_for(layer, module, integer=integer, matmulnbits=matmulnbits)
        except OnnxExportError as exc:
            if not keep_fp:
                raise
            kept[layer] = str(exc).split(": ", 1)[-1]
            log.warning("keeping %s in float: %s", layer, kept[layer])
            stand_in = export_module_for(layer, module, float_activations=True, matmulnbits=matmulnbits)
        # 4- and 2-bit codes fit INT4; 7-bit (reduce-range) codes and grouped codes (code x group
        # multiplier) need int8.
        if module.code_bits <= 4 and not (isinstance(stand_in, OnnxQLinear) and stand_in.nbits is not None):
            sub_byte.add(f"denoiser.{layer}.{'w_t' if isinstance(module, QLinear) else 'w'}")
        parent_name, _, child = layer.rpartition(".")
        parent = denoiser.get_submodule(parent_name) if parent_name else denoiser
        setattr(parent, child, stand_in)
    return sub_byte, kept


def _copy_pipeline_files(bundle: Path, tmp: Path, components: list[Component], manifest: dict[str, Any]) -> None:
    """Tokenizers, scheduler and model_index.json as they are; model components' configs only."""
    shutil.copy2(bundle / "model_index.json", tmp / "model_index.json")
    models = {c.name for c in components} | {manifest["pipeline"]["denoiser"]}
    for sub in sorted(p for p in bundle.iterdir() if p.is_dir()):
        if sub.name in models:
            (tmp / sub.name).mkdir()
            for cfg in ("config.json", "generation_config.json"):
                if (sub / cfg).is_file():
                    shutil.copy2(sub / cfg, tmp / sub.name / cfg)
        else:
            shutil.copytree(sub, tmp / sub.name)


def _checked_denoiser(
    component: Component, file: Path, config: OnnxExportConfig, names: set[str], bundle: LoadedBundle
) -> tuple[dict[str, Any], Component, dict[str, torch.Tensor] | None]:
    """Export the denoiser; a graph exported with dynamic axes is run at another shape first
    (:mod:`diffkiln.export.onnx.check`). The exports of :data:`DYNAMIC_ATTEMPTS` in order, until one
    passes; then the recorded shapes.

    Returns:
        (the manifest entry, the component as exported (its int inputs, traced example), the
        inputs of the check's other call; None for a static graph)."""
    failures: list[str] = []
    calls: dict[bool, tuple[Component, dict[str, torch.Tensor]] | str] = {}
    for attempt, swapped, batch_only in DYNAMIC_ATTEMPTS if config.dynamic else ():
        if batch_only not in calls:
            calls[batch_only] = _second_call(component, config, bundle, batch_only)
        second = calls[batch_only]
        if isinstance(second, str):  # the pipeline does not run there, or fixes that size in the graph
            failures.append(f"{attempt}: {second}")
            continue
        base, tensors = second
        traced, checked = (tensors, base.example) if swapped else (base.example, tensors)
        exported = dataclasses.replace(base, example=traced)
        try:
            entry = export_component(exported, file, config, names, batch_only=batch_only, fallback=False)
            _check_int_inputs(entry, base.int_inputs)
        except Exception as exc:  # torch.export raises many types; the reason goes to the manifest
            failures.append(f"{attempt}: {type(exc).__name__}: {error_summary(exc)}")
            continue
        check = run_check(file, list(base.example), base.module, checked) if entry["dynamic"] else None
        if check is not None and check["ok"]:
            return _verified(entry, exported, checked, check, failures), exported, checked
        failures.append(f"{attempt}: {check['error'] if check else 'no axis stayed dynamic'}")
        log.warning("%s: %s", component.name, failures[-1])
    try:
        static = export_component(component, file, dataclasses.replace(config, dynamic=False), names)
    except Exception as exc:  # torch.export and torch.onnx raise many types
        raise OnnxExportError(_not_exported(component, f"{type(exc).__name__}: {error_summary(exc)}")) from None
    # Run once at the recorded call: a graph onnxruntime cannot load or run is refused, not written.
    check = run_check(file, list(component.example), component.module, component.example)
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


_COPIED_CALIBRATION = ("prompts", "call_kwargs")
"""What an ONNX manifest copies of its bundle's calibration record."""

DYNAMIC_ATTEMPTS = (
    ("every axis dynamic", False, False),
    ("every axis dynamic, traced at the second shape", True, False),
    ("the batch axis dynamic", False, True),
)
"""The dynamic exports of the denoiser, tried in order: (what, traced at the second shape and
checked at the recorded call, batch axis only). The others are traced at the recorded call and
checked at the second shape (another batch and, but for the batch-only one, another size).

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
    overrides = {} if batch_only else second_shape(pipe, manifest, dict(config.check_call_kwargs))
    recorded = set(component.example) - set(component.int_inputs)
    try:
        for batch in (2, 1):
            call = bundle_call(pipe, manifest, config.prompt, batch=batch, overrides=overrides)
            tensors, options = flatten_kwargs(bind_call(bundle.denoiser, *capture_call(pipe, bundle.denoiser, call)))
            # A denoiser taking per-sample lists (Z-Image) has an input per sample: another batch
            # is another graph, so the second shape keeps the recorded batch and varies the size.
            if set(tensors) == recorded or batch_only:
                break
    except Exception as exc:  # a pipeline raises its own types at a size it does not take
        return f"the call at a second shape failed: {type(exc).__name__}: {exc}"[:400]
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


def _verified(
    entry: dict[str, Any], component: Component, tensors: dict[str, Any], check: dict[str, Any], failures: list[str]
) -> dict[str, Any]:
    """The entry with only the symbolic axes the check really varied declared dynamic (the others
    listed as unverified), and the check's result."""
    varied = {
        n: [a for a, (x, y) in enumerate(zip(component.example[n].shape, tensors[n].shape, strict=True)) if x != y]
        for n in component.example
    }
    dynamic = {n: [a for a in axes if a in varied.get(n, [])] for n, axes in entry["dynamic_axes"].items()}
    unverified = {n: [a for a in axes if a not in dynamic[n]] for n, axes in entry["dynamic_axes"].items()}
    out = {**entry, "dynamic_axes": dynamic, "dynamic": any(dynamic.values()), "check": check,
           "unverified_axes": {n: a for n, a in unverified.items() if a}}  # fmt: skip
    if failures:
        out["wider_axes_failed"] = failures
    return out


def export_onnx(bundle: LoadedBundle, config: OnnxExportConfig) -> Path:
    """Export a loaded bundle to ONNX (see the module docstring).

    Args:
        bundle: the verified bundle, loaded on CPU (``diffkiln.runtime.open_bundle``).
        config: destination, opset, dynamic axes, float fallback.

    Returns:
        The output folder.

    Raises:
        BundleError: ``out`` exists without ``overwrite``, or a module bundle (no pipeline).
        OnnxExportError: a layer cannot be expressed and ``keep_fp`` is off (the message names
            the layer and why).
    """
    pipe, manifest = bundle.pipeline, bundle.manifest
    if pipe is None:
        raise BundleError("an ONNX export needs a pipeline bundle; this bundle holds a bare module")
    denoiser_name = manifest["pipeline"]["denoiser"]
    denoiser = bundle.denoiser
    # Fail on an inexpressible layer before the (slow) recording call.
    sub_byte, kept = _swap_quantized_layers(
        denoiser, config.keep_fp, config.compute == OnnxCompute.INTEGER, config.matmulnbits
    )
    components = recorded_components(pipe, manifest, config.prompt, not config.components)
    if not config.components:
        components = components[:1]
    entries: dict[str, Any] = {}
    skipped: dict[str, str] = {}
    cache_graph: dict[str, Any] | None = None
    bar = tqdm(components, desc="exporting to ONNX", unit="component", disable=not config.progress)
    with atomic_directory(Path(config.out), config.overwrite) as tmp, bar:  # bar: closed on a failure too
        for component in bar:
            bar.set_postfix_str(component.name)
            if component.kind == ComponentKind.DENOISER:
                entries[component.name], cache_graph = _denoiser_graphs(component, tmp, config, sub_byte, bundle)
                continue
            # A VAE's encode goes into its decoder's entry (one stand-in answers both methods), so
            # it is exported only where its decoder was.
            encoder = component.kind == ComponentKind.VAE_ENCODER
            if encoder and component.name not in entries:
                continue
            file = tmp / _VAE_FILES.get(component.kind, f"{component.name}.onnx")
            key = f"{component.name}.encode" if encoder else component.name
            try:
                entry = export_component(component, file, config, set())
            except Exception as exc:  # torch.export raises many types; the reason goes to the manifest
                reason = f"{type(exc).__name__}: {error_summary(exc)}"
                log.warning("%s is not exported: %s", key, reason)
                file.unlink(missing_ok=True)
                if component.optional:  # the recorded call never used it: the folder stays loadable
                    entries[component.name]["encoder_skipped"] = reason
                else:
                    skipped[key] = reason
                continue
            if encoder:
                entries[component.name]["encoder"] = entry
            else:
                entries[component.name] = entry
                if component.encoder_skipped:
                    entry["encoder_skipped"] = component.encoder_skipped
        _copy_pipeline_files(bundle.path, tmp, [c for c in components if c.name in entries], manifest)
        for component in components:
            own = save_own_tensors(tmp, component.name, component.own_tensors) if component.name in entries else None
            if own is not None:
                entries[component.name]["own_tensors"] = own
        onnx_manifest = {
            "format": ONNX_FORMAT,
            "version": ONNX_VERSION,
            "opset": config.opset,
            "compute": config.compute.value,
            "matmulnbits": config.matmulnbits,
            "pipeline": {"class": manifest["pipeline"]["class"], "denoiser": denoiser_name},
            "components": entries,
            "skipped_components": skipped,
            "kept_fp": kept,
            "bundle": {
                "source": manifest["source"],
                "recipe": manifest["quant"]["recipe"],
                # So that a report on the folder samples as one on the bundle does (a user folder's
                # size and frames, prompts of its domain).
                "calibration": {k: v for k, v in calibration_record(manifest).items() if k in _COPIED_CALIBRATION},
            },
            "cache": manifest.get("cache") or {},
            "cache_graph": cache_graph,
            "sparsity_not_exported": _sparsity_note(manifest),
            "tokenizers": manifest.get("tokenizers") or {},
            "files": file_table(tmp),
        }
        (tmp / MANIFEST_NAME).write_text(json.dumps(onnx_manifest, indent=2) + "\n", encoding="utf-8")
    return Path(config.out)


def _sparsity_note(manifest: dict[str, Any]) -> str | None:
    """Why the bundle's sparse-attention masks are not in the ONNX graphs (None without masks)."""
    if not manifest.get("sparsity"):
        return None
    note = (
        "the bundle's sparse-attention masks are not exported: ONNX has no block-sparse attention, so the graphs "
        "run attention dense (the same FLOPs as without masks, outputs as the bundle loaded with sparse=False)"
    )
    log.warning("%s", note)
    return note


def _denoiser_graphs(
    component: Component, tmp: Path, config: OnnxExportConfig, sub_byte: set[str], bundle: LoadedBundle
) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """The denoiser's graph, checked; with a block-range cache schedule, the fill graph (its extra
    outputs counted in ``cache_outputs``) and the reuse graph's manifest entry
    (:mod:`diffkiln.export.onnx.cache_graphs`)."""
    cache = bundle.manifest.get("cache") or {}
    schedule = CacheSchedule.from_dict(cache) if cache else None
    if schedule is None or schedule.mechanism is CacheMechanism.WHOLE:
        return _checked_denoiser(component, tmp / "denoiser.onnx", config, sub_byte, bundle)[0], None
    tracer = CacheStepTracer(bundle.denoiser, schedule)
    try:
        entry, fill, other = _checked_denoiser(fill_component(component, tracer), tmp / "denoiser.onnx", config,
                                               sub_byte, bundle)  # fmt: skip
        # The reuse graph takes what the fill graph takes (LTX's latent sizes as int inputs), dynamic
        # where the fill graph is, and is checked at the fill's two calls.
        reuse, file = reuse_component(fill), tmp / CACHED_FILE
        n_values = len(reuse.example) - len(fill.example)
        batch_only = not any(a for axes in entry["dynamic_axes"].values() for a in axes)
        reuse_config = dataclasses.replace(config, dynamic=bool(entry["dynamic"]))
        reuse_entry = export_component(reuse, file, reuse_config, sub_byte, batch_only=batch_only)
        assert isinstance(fill.module, CacheFillDenoiser)
        second = reuse_inputs(fill.module, other) if other is not None else None
        check = check_reuse(file, reuse, reuse_entry, second)
        if second is not None and check["ok"] and reuse_entry["dynamic"]:
            reuse_entry = _verified(reuse_entry, reuse, second, check, [])
        if not check["ok"] and reuse_entry["dynamic"]:
            # Then the batch axis alone, then the recorded shapes, with the recorded call's options
            # (its ints fixed): at another size such a reuse graph refuses the input, by name.
            log.warning("%s: the dynamic reuse graph failed (%s)", component.name, check["error"])
            reuse = reuse_component(fill_component(component, tracer))
            for dynamic in (True, False)[1 if batch_only else 0 :]:
                reuse_entry = export_component(reuse, file, dataclasses.replace(config, dynamic=dynamic), sub_byte,
                                               batch_only=True)  # fmt: skip
                check = check_reuse(file, reuse, reuse_entry)
                if check["ok"]:
                    break
        if not check["ok"]:
            raise OnnxExportError(
                f"the cache schedule's reuse graph does not match the torch runtime: {check['error']}"
            )
    finally:
        tracer.remove()
    return {**entry, "cache_outputs": n_values}, schedule_entry(schedule, {**reuse_entry, "check": check}, n_values)


def export_module_onnx(
    module: nn.Module, call: dict[str, Any], path: Path, config: OnnxExportConfig, float16: bool = True
) -> dict[str, Any]:
    """Export a bare module, float or quantized in memory (``diffkiln.quantize_``), to one ONNX file.

    Its diffkiln integer modules become their QDQ (or integer) stand-ins, as in a bundle's export,
    and its old-style weight norms are folded into their weights
    (:func:`~diffkiln.export.onnx.program.fold_weight_norms`): ``module`` is changed in place
    (export a copy to keep it). For denoisers outside a pipeline, e.g. benchmarks of full-size
    architectures.

    Args:
        module: the model.
        call: one call's keyword arguments (tensors, dicts of tensors, and fixed options).
        path: the ``.onnx`` file to write (its folder is created).
        config: opset, dynamic axes (``out`` is not used), compute form, float fallback.
        float16: store float32 initializers that are exact in float16 as float16. Default True.

    Returns:
        The export's record: inputs, outputs, dynamic axes (as in an ONNX folder's manifest).

    Raises:
        OnnxExportError: a layer cannot be expressed and ``keep_fp`` is off.
    """
    sub_byte, _ = _swap_quantized_layers(module, config.keep_fp, config.compute == OnnxCompute.INTEGER,
                                         config.matmulnbits)  # fmt: skip
    tensors, options = flatten_kwargs(call)
    wrapper = _Denoiser(module, list(tensors), options, batch_inputs(tensors))
    component = Component(path.stem, ComponentKind.DENOISER, wrapper, tensors, options)
    path.parent.mkdir(parents=True, exist_ok=True)
    return export_component(component, path, config, sub_byte, float16)


def export_denoiser_onnx(bundle: LoadedBundle, config: OnnxExportConfig) -> Path:
    """Export only the denoiser; returns ``config.out / "denoiser.onnx"``."""
    from dataclasses import replace

    export_onnx(bundle, replace(config, components=False))
    return Path(config.out) / "denoiser.onnx"
