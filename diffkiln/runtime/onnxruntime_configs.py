"""The configs and meta-device skeletons of an ONNX export folder's components: what the
onnxruntime backend's stand-ins answer a pipeline's reads of their torch class with."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from diffkiln.core.confine import confined_file
from diffkiln.core.errors import BundleError
from diffkiln.core.schema import read_json

__all__ = ["component_config", "fill_own_tensors", "meta_model"]


def component_config(folder: Path, name: str, kind: str) -> Any:
    """The component's config from its folder: a transformers ``AutoConfig`` for a text encoder,
    else the diffusers config as a ``FrozenDict``."""
    from diffusers.configuration_utils import FrozenDict

    path = confined_file(folder, f"{name}/config.json", f"the {name} component's config")
    if kind == "text_encoder":
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(folder / name, local_files_only=True)
    return FrozenDict(read_json(path))


def meta_model(folder: Path, name: str, config: Any) -> nn.Module:
    """The component's class (from its ``model_index.json`` entry) built from its config on the
    meta device (no memory)."""
    from diffkiln.core.errors import InvalidInputError
    from diffkiln.core.pipelines import resolve_component_class

    entry = read_json(folder / "model_index.json").get(name)
    library = entry[0] if isinstance(entry, list) and len(entry) == 2 and isinstance(entry[0], str) else "diffusers"
    try:
        cls: Any = resolve_component_class(library, str(config["_class_name"]))
    except InvalidInputError as exc:
        raise BundleError(f"cannot build {name}: {exc}") from None
    with torch.device("meta"):
        module: nn.Module = cls.from_config(dict(config))
    return module


def fill_own_tensors(skeleton: nn.Module, folder: Path, relative: str, name: str) -> None:
    """Give ``skeleton`` the data of its own top-level tensors from the export's safetensors file
    (``own_tensors``; LTX's VAE ``latents_mean``, which the pipeline reads to denormalize).

    Raises:
        BundleError: the file is outside the folder or unreadable, or names a tensor the skeleton
            does not hold itself, or holds in another shape.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = confined_file(folder, relative, f"components.{name}.own_tensors")
    try:
        tensors = load_file(str(path))  # safetensors: data only, nothing executed
    except (SafetensorError, OSError, ValueError) as exc:
        raise BundleError(f"{relative}: not a readable safetensors file: {exc}") from None
    buffers = dict(skeleton.named_buffers(recurse=False))
    parameters = dict(skeleton.named_parameters(recurse=False))
    for key, tensor in tensors.items():
        held = buffers.get(key, parameters.get(key))
        if held is None:
            raise BundleError(
                f"{relative}: {key!r} is not a tensor the {name} class holds itself "
                f"(it holds {sorted(buffers | parameters)}); re-export the bundle"
            )
        if tuple(held.shape) != tuple(tensor.shape):
            shapes = f"{list(tensor.shape)}, the {name} class {list(held.shape)}"
            raise BundleError(f"{relative}: {key!r} has shape {shapes}")
        if key in parameters:
            skeleton._parameters[key] = nn.Parameter(tensor, requires_grad=False)
        else:
            skeleton._buffers[key] = tensor
