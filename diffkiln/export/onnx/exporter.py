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

from torch import nn
from tqdm.auto import tqdm

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
from diffkiln.export.onnx.check import recorded_components
from diffkiln.export.onnx.checked_export import checked_denoiser, verified_entry
from diffkiln.export.onnx.components import (
    Component,
    ComponentKind,
    _Denoiser,
    batch_inputs,
    flatten_kwargs,
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

_VERSION_WITHOUT_EXPERTS = 3
"""The ONNX export version a folder without experts is written as (version 4 added them)."""
_VERSION_WITH_EXPERTS = 4
"""The version a folder with experts and one call form of one prediction is written as."""

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


_COPIED_CALIBRATION = ("prompts", "call_kwargs")
"""What an ONNX manifest copies of its bundle's calibration record."""

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
    # Fail on an inexpressible layer before the (slow) recording call. The experts of the
    # denoiser's class (Wan 2.2's transformer_2) are graphs of their own, exported as it is.
    sub_byte: dict[str, set[str]] = {}
    kept: dict[str, str] = {}
    for name, model in {denoiser_name: bundle.denoiser, **bundle.experts}.items():
        sub_byte[name], kept_here = _swap_quantized_layers(
            model, config.keep_fp, config.compute == OnnxCompute.INTEGER, config.matmulnbits
        )
        kept.update({(layer if name == denoiser_name else f"{name}.{layer}"): r for layer, r in kept_here.items()})
    components = recorded_components(pipe, manifest, config.prompt, not config.components)
    if not config.components:
        components = [c for c in components if c.kind == ComponentKind.DENOISER]
    entries: dict[str, Any] = {}
    skipped: dict[str, str] = {}
    cache_graph: dict[str, Any] | None = None
    bar = tqdm(components, desc="exporting to ONNX", unit="component", disable=not config.progress)
    with atomic_directory(Path(config.out), config.overwrite) as tmp, bar:  # bar: closed on a failure too
        for component in bar:
            bar.set_postfix_str(component.name)
            if component.name == denoiser_name:
                entries[component.name], cache_graph = _denoiser_graphs(
                    component, tmp, config, sub_byte[denoiser_name], bundle
                )
                continue
            if component.kind == ComponentKind.DENOISER:  # an expert: the cache schedule is the denoiser's
                file = tmp / f"{component.name}.onnx"
                entry = checked_denoiser(component, file, config, sub_byte[component.name], bundle)[0]
                entries[component.name] = _with_variants(entry, component, file, config, sub_byte[component.name],
                                                         bundle)  # fmt: skip
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
            # Version 4 only with experts: a folder without them stays readable by version-3 runtimes.
            "version": _version(entries, bool(bundle.experts)),
            "opset": config.opset,
            "compute": config.compute.value,
            "matmulnbits": config.matmulnbits,
            "pipeline": {
                "class": manifest["pipeline"]["class"],
                "denoiser": denoiser_name,
                **({"experts": sorted(bundle.experts)} if bundle.experts else {}),
            },
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
        entry = checked_denoiser(component, tmp / "denoiser.onnx", config, sub_byte, bundle)[0]
        return _with_variants(entry, component, tmp / "denoiser.onnx", config, sub_byte, bundle), None
    if component.variants:
        raise OnnxExportError(
            f"the sampler calls the {component.name} in {1 + len(component.variants)} forms (options "
            f"{list(component.form_keys)}), and a '{schedule.mechanism.value}' cache schedule's graph pair follows "
            "one; export a bundle optimized without a cache schedule, or run this one in the torch runtime"
        )
    tracer = CacheStepTracer(bundle.denoiser, schedule)
    try:
        entry, fill, other = checked_denoiser(fill_component(component, tracer), tmp / "denoiser.onnx", config,
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
            reuse_entry = verified_entry(reuse_entry, reuse, second, check, [])
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


def _version(entries: dict[str, Any], experts: bool) -> int:
    """The oldest manifest version that holds what the folder holds, so older runtimes read it."""
    if any(e.get("variants") or len(e.get("output_fields") or []) > 1 for e in entries.values()
           if e.get("kind") == ComponentKind.DENOISER):  # fmt: skip
        return ONNX_VERSION
    return _VERSION_WITH_EXPERTS if experts else _VERSION_WITHOUT_EXPERTS


def _with_variants(
    entry: dict[str, Any], component: Component, file: Path, config: OnnxExportConfig, names: set[str],
    bundle: LoadedBundle,
) -> dict[str, Any]:
    """``entry`` with a checked graph per variant of the denoiser's calls
    (:attr:`~diffkiln.export.onnx.components.Component.variants`), written beside ``file`` as
    ``<stem>_variant_<k>.onnx``."""
    if not component.variants:
        return entry
    # The model is the same: the dynamic attempt that passed for its first form is tried first.
    first = (entry.get("check") or {}).get("attempt") if entry.get("dynamic") else None
    variants = [
        checked_denoiser(variant, file.with_name(f"{file.stem}_variant_{k}.onnx"), config, names, bundle, first)[0]
        for k, variant in enumerate(component.variants, 1)
    ]
    return {**entry, "variants": variants}


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
