"""Read a verified bundle into modules: the denoiser built without its float weights, or the
bundle's layers put into the user's own model object.

Loading never unpickles and never imports code a bundle names beyond diffusers, transformers and
diffusers' pipeline modules: tensors come from safetensors, metadata from JSON.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn

from diffkiln.core.confine import confined_file
from diffkiln.core.derived import check_derived_buffers, real_buffers_meta_params
from diffkiln.core.errors import BundleError, InvalidInputError
from diffkiln.core.layers import find_quantizable_layers, layer_kind
from diffkiln.core.pipelines import assemble_pipeline, resolve_component_class
from diffkiln.core.schema import LoadedBundle, read_json, read_manifest, verify_files
from diffkiln.core.tokenizer_print import check_tokenizer_prints
from diffkiln.nn.swap import replace_layers
from diffkiln.nn.validate import check_float_tensor, check_layers

__all__ = ["build_denoiser", "load_into", "open_bundle", "quantized_components"]


def _set_tensor(root: nn.Module, name: str, value: torch.Tensor) -> None:
    module_name, _, attr = name.rpartition(".")
    try:
        module = root.get_submodule(module_name) if module_name else root
    except AttributeError:
        raise BundleError(f"the bundle's tensor {name!r} is not a tensor of this model") from None
    current = module._parameters.get(attr, module._buffers.get(attr))
    if current is None or tuple(current.shape) != tuple(value.shape):
        shape = None if current is None else list(current.shape)
        raise BundleError(f"the bundle's tensor {name!r} {list(value.shape)} does not fit this model's ({shape})")
    if current.is_floating_point() != value.is_floating_point() or (
        not current.is_floating_point() and current.dtype != value.dtype
    ):
        raise BundleError(f"the bundle's tensor {name!r} is {value.dtype}; this model's is {current.dtype}")
    check_float_tensor(name, value)
    if current.is_floating_point():
        value = value.to(current.dtype)  # stored as FP16; the model runs in its own dtype
    if attr in module._parameters:
        module._parameters[attr] = nn.Parameter(value, requires_grad=False)
    else:
        module._buffers[attr] = value


def _denoiser_class(bundle: Path, component: str, class_name: str) -> Any:
    """A quantized component's class: from its ``model_index.json`` entry (diffusers, or a diffusers
    pipeline module such as ``stable_audio``), else diffusers' top level."""
    library = "diffusers"
    index_path = bundle / "model_index.json"
    if index_path.is_file():
        entry = read_json(index_path).get(component)
        if isinstance(entry, list) and len(entry) == 2 and isinstance(entry[0], str):
            library = entry[0]
    try:
        return resolve_component_class(library, class_name)
    except InvalidInputError as exc:
        raise BundleError(f"cannot build the {component}: {exc}") from None


def quantized_components(manifest: dict[str, Any]) -> dict[str, tuple[str, dict[str, Any]]]:
    """The bundle's quantized components: the denoiser first, then its experts (bundle version 9),
    each as (class name, ``quant`` section), by component name."""
    pipe_info = manifest["pipeline"]
    out = {str(pipe_info["denoiser"]): (str(pipe_info["denoiser_class"]), manifest["quant"])}
    for name, entry in (manifest.get("experts") or {}).items():
        out[str(name)] = (str(entry["denoiser_class"]), entry["quant"])
    return out


def build_denoiser(bundle: Path, manifest: dict[str, Any], component: str | None = None) -> nn.Module:
    """The bundle's denoiser (or the expert ``component``) with its integer layers, built on the
    meta device and filled from its weights file (the manifest must already be verified).

    Raises:
        BundleError: the weights file and the manifest disagree, a tensor is missing, or
            ``component`` is not a quantized component of the bundle.
    """
    components = quantized_components(manifest)
    name = component or str(manifest["pipeline"]["denoiser"])
    if name not in components:
        raise BundleError(f"{name!r} is not a quantized component of this bundle; it has {sorted(components)}")
    class_name, quant = components[name]
    cls = _denoiser_class(bundle, name, class_name)
    config_file = f"{name}/config.json"
    confined_file(bundle, config_file, f"{name}'s config")
    derived = quant.get("derived_buffers", {})
    try:
        config = cls.load_config(bundle / name)
        # Parameters on meta (they come from the bundle); buffers real, and so are the tensors a
        # constructor keeps as plain attributes (Lumina2's and QwenImage's rotary tables): no file
        # holds those, the constructor is their only source, as in diffusers' own loading.
        with real_buffers_meta_params():
            denoiser = cls.from_config(config)
    except Exception as exc:  # diffusers raises many types on a bad config (OSError, ValueError...)
        raise BundleError(f"cannot build the {cls.__name__} from {config_file}: {type(exc).__name__}: {exc}") from None
    check_derived_buffers(denoiser, derived)
    for buffer, buf in list(denoiser.named_buffers()):
        if buffer not in derived and not buf.is_meta:  # from the bundle: on meta until filled, missing is an error
            module_name, _, attr = buffer.rpartition(".")
            denoiser.get_submodule(module_name)._buffers[attr] = torch.empty_like(buf, device="meta")
    per_layer, fp = _read_tensors(bundle, manifest, quant)
    metas = {layer: info["meta"] for layer, info in quant["layers"].items()}
    check_layers(denoiser, per_layer, metas)
    try:
        replace_layers(denoiser, per_layer, metas)
    except KeyError as exc:
        raise BundleError(str(exc)) from None
    for key, t in fp.items():
        _set_tensor(denoiser, key, t)
    left = [n for n, t in [*denoiser.named_parameters(), *denoiser.named_buffers()] if t.is_meta]
    if left:
        raise BundleError(f"the bundle lacks {len(left)} denoiser tensor(s), e.g. {left[:3]}")
    return denoiser.eval()


def _read_tensors(
    bundle: Path, manifest: dict[str, Any], quant: dict[str, Any]
) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
    """(per quantized layer of ``quant``'s component: its tensors by suffix; FP tensors by parameter name)."""
    if quant.get("weights_file") not in manifest["files"]:
        raise BundleError(f"quant.weights_file {quant.get('weights_file')!r} is not a file the manifest lists")
    path = confined_file(bundle, quant["weights_file"], "quant.weights_file")
    try:
        tensors = load_file(str(path))
    except Exception as exc:  # safetensors raises several types for malformed files
        raise BundleError(f"cannot read {quant['weights_file']}: {exc}") from None
    per_layer: dict[str, dict[str, torch.Tensor]] = {}
    fp: dict[str, torch.Tensor] = {}
    for key, t in tensors.items():
        if key.startswith("fp::"):
            fp[key[4:]] = t
        else:
            layer, _, suffix = key.partition("::")
            per_layer.setdefault(layer, {})[suffix] = t
    if set(per_layer) != set(quant["layers"]):
        raise BundleError("the weights file and the manifest disagree on which layers are quantized")
    return per_layer, fp


def load_into(model: nn.Module, bundle: str | os.PathLike[str]) -> nn.Module:
    """Put a bundle's quantized layers and float tensors into ``model`` itself (in place).

    For a module bundle (``diffkiln.export_bundle`` of a bare module) or a pipeline bundle's
    denoiser, and the user's own model object of the same architecture: every quantized layer
    must be a quantizable layer of the same kind and weight shape in ``model``, and every float
    tensor a parameter or buffer of the same shape. Nothing is changed until all of that is checked.

    Returns:
        ``model``, its layers replaced by integer modules.

    Raises:
        BundleError: the bundle fails its checks, or does not fit ``model`` (the message names the
            first mismatch).
    """
    path = Path(bundle)
    manifest = read_manifest(path)
    verify_files(path, manifest)
    per_layer, fp = _read_tensors(path, manifest, manifest["quant"])
    metas = {name: info["meta"] for name, info in manifest["quant"]["layers"].items()}
    layers = find_quantizable_layers(model)
    for name, meta in metas.items():
        module = layers.get(name)
        if module is None or layer_kind(module) != meta.get("kind"):
            raise BundleError(f"the bundle's layer {name!r} ({meta.get('kind')}) is not a layer of this model")
        weight = module.weight
        if isinstance(weight, torch.Tensor) and list(weight.shape) != list(meta.get("weight_shape") or []):
            shape = meta.get("weight_shape")
            raise BundleError(f"{name}: the bundle's weight shape {shape} is not this model's {list(weight.shape)}")
    own = dict([*model.named_parameters(), *model.named_buffers()])
    for key, t in fp.items():
        if key not in own or tuple(own[key].shape) != tuple(t.shape):
            raise BundleError(f"the bundle's tensor {key!r} {tuple(t.shape)} does not fit this model")
    derived = manifest["quant"].get("derived_buffers", {})
    check_derived_buffers(model, derived)
    check_layers(model, per_layer, metas)
    quantized = {f"{layer}.{p}" for layer in metas for p, _ in layers[layer].named_parameters(recurse=False)}
    missing = sorted(set(own) - set(fp) - set(derived) - quantized)
    if missing:
        raise BundleError(f"the bundle lacks {len(missing)} tensor(s) of this model, e.g. {missing[:3]}")
    replace_layers(model, per_layer, metas)
    with torch.no_grad():
        for key, t in fp.items():
            _set_tensor(model, key, t)
    return model.eval()


def open_bundle(bundle: str | os.PathLike[str]) -> LoadedBundle:
    """Verify and load a bundle on CPU: its denoiser, and for a pipeline bundle the pipeline.

    Raises:
        BundleError: the bundle is missing, corrupt, truncated, tampered, of a future version, or
            names a class diffkiln does not import.
    """
    path = Path(bundle)
    manifest = read_manifest(path)
    verify_files(path, manifest)
    if manifest.get("kind") == "module":
        raise BundleError(f"{path} holds a bare module; put it into your model with diffkiln.runtime.load_into")
    built = {name: build_denoiser(path, manifest, name) for name in quantized_components(manifest)}
    denoiser_name = str(manifest["pipeline"]["denoiser"])
    try:
        pipe = assemble_pipeline(path, built)
    except InvalidInputError as exc:
        raise BundleError(f"cannot assemble the pipeline: {exc}") from None
    except Exception as exc:
        raise BundleError(f"cannot assemble the pipeline from {path}: {type(exc).__name__}: {exc}") from None
    check_tokenizer_prints(pipe.components, manifest.get("tokenizers") or {}, str(path))
    pipe.diffkiln_manifest = manifest
    experts = {name: module for name, module in built.items() if name != denoiser_name}
    return LoadedBundle(path, manifest, built[denoiser_name], pipe, experts)
