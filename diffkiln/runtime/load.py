"""``diffkiln.runtime.load``: a bundle -> a diffusers pipeline whose denoiser runs integer kernels.

Loading checks the manifest's schema and version and every file's size and sha256 before using
anything, reads tensors with safetensors and metadata with JSON only (never unpickles), and
builds the denoiser without its float weights: the architecture is created on the meta device
(but for the buffers its constructor rebuilds, which are checked against the bundle's
fingerprints), quantized layers are built from int8 tensors, and the remaining tensors are
assigned from the bundle.
"""

from __future__ import annotations

import importlib
import os
from enum import Enum
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn

from diffkiln.core.derived import check_derived_buffers, real_buffers_meta_params
from diffkiln.core.errors import BundleError, InvalidInputError
from diffkiln.core.pipelines import assemble_pipeline, resolve_component_class
from diffkiln.core.schema import read_json, read_manifest, verify_files
from diffkiln.nn.swap import replace_layers

__all__ = ["Backend", "build_denoiser", "is_bundle", "load", "resolve_device"]


def is_bundle(path: str | os.PathLike[str]) -> bool:
    """True when ``path`` is a directory holding a diffkiln manifest (not yet verified)."""
    return (Path(path) / "manifest.json").is_file()


def resolve_device(device: str) -> torch.device:
    """Map "auto" | "cpu" | "cuda" | "npu" (or "cuda:1", ...) to a torch device.

    "auto" prefers an Ascend NPU (when torch_npu is installed and sees one), then CUDA, then CPU.

    Raises:
        ValueError: an unknown device name, or a device this machine does not have.
    """
    if device == "auto":
        try:
            importlib.import_module("torch_npu")
            if torch.npu.is_available():  # type: ignore[attr-defined]
                return torch.device("npu")
        except ImportError:
            pass
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    kind = device.split(":")[0]
    if kind not in ("cpu", "cuda", "npu"):
        raise ValueError(f"unknown device {device!r}; valid: auto, cpu, cuda, npu")
    if kind == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' requested but no CUDA device is available; use --device cpu or auto")
    if kind == "npu":
        try:
            importlib.import_module("torch_npu")
        except ImportError:
            raise ValueError("device 'npu' needs torch_npu; install diffkiln[npu] on an Ascend host") from None
    return torch.device(device)


def _set_tensor(root: nn.Module, name: str, value: torch.Tensor) -> None:
    module_name, _, attr = name.rpartition(".")
    module = root.get_submodule(module_name) if module_name else root
    current = module._parameters.get(attr, module._buffers.get(attr))
    if current is not None and current.is_floating_point() and value.is_floating_point():
        value = value.to(current.dtype)  # stored as FP16; the model runs in its own dtype
    if attr in module._parameters:
        module._parameters[attr] = nn.Parameter(value, requires_grad=False)
    else:
        module._buffers[attr] = value


def _denoiser_class(bundle: Path, pipe_info: dict[str, Any]) -> Any:
    """The denoiser's class: from its ``model_index.json`` entry (diffusers, or a diffusers
    pipeline module such as ``stable_audio``), else diffusers' top level."""
    library = "diffusers"
    index_path = bundle / "model_index.json"
    if index_path.is_file():
        entry = read_json(index_path).get(pipe_info["denoiser"])
        if isinstance(entry, list) and len(entry) == 2 and isinstance(entry[0], str):
            library = entry[0]
    try:
        return resolve_component_class(library, str(pipe_info["denoiser_class"]))
    except InvalidInputError as exc:
        raise BundleError(f"cannot build the denoiser: {exc}") from None


def build_denoiser(bundle: Path, manifest: dict[str, Any]) -> nn.Module:
    """The bundle's denoiser with its integer layers, built on the meta device and filled from the
    weights file (the manifest must already be verified).

    Raises:
        BundleError: the weights file and the manifest disagree, or a tensor is missing.
    """

    pipe_info, quant = manifest["pipeline"], manifest["quant"]
    cls = _denoiser_class(bundle, pipe_info)
    config = cls.load_config(bundle / pipe_info["denoiser"])
    derived = quant.get("derived_buffers", {})
    # Parameters on meta (they come from the bundle); buffers real when the constructor's tables
    # are used instead of stored ones.
    with real_buffers_meta_params() if derived else torch.device("meta"):
        denoiser = cls.from_config(config)
    check_derived_buffers(denoiser, derived)
    for name, buf in list(denoiser.named_buffers()):
        if name not in derived and not buf.is_meta:  # from the bundle: on meta until filled, missing is an error
            module_name, _, attr = name.rpartition(".")
            denoiser.get_submodule(module_name)._buffers[attr] = torch.empty_like(buf, device="meta")
    try:
        tensors = load_file(str(bundle / quant["weights_file"]))
    except Exception as exc:  # safetensors raises several types for malformed files
        raise BundleError(f"cannot read {quant['weights_file']}: {exc}") from None
    per_layer: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        if key.startswith("fp::"):
            continue
        layer, _, suffix = key.partition("::")
        per_layer.setdefault(layer, {})[suffix] = t
    metas = {name: info["meta"] for name, info in quant["layers"].items()}
    if set(per_layer) != set(metas):
        raise BundleError("the weights file and the manifest disagree on which layers are quantized")
    try:
        replace_layers(denoiser, per_layer, metas)
    except KeyError as exc:
        raise BundleError(str(exc)) from None
    for key, t in tensors.items():
        if key.startswith("fp::"):
            _set_tensor(denoiser, key[4:], t)
    left = [n for n, t in [*denoiser.named_parameters(), *denoiser.named_buffers()] if t.is_meta]
    if left:
        raise BundleError(f"the bundle lacks {len(left)} denoiser tensor(s), e.g. {left[:3]}")
    return denoiser.eval()


class Backend(str, Enum):
    """What runs the model components."""

    TORCH = "torch"
    """The bundle's integer kernels in PyTorch (a bundle directory)."""
    ONNXRUNTIME = "onnxruntime"
    """onnxruntime sessions (a folder written by ``diffkiln export BUNDLE --format onnx``)."""


def load(
    bundle: str | os.PathLike[str],
    device: str = "auto",
    backend: Backend | str = Backend.TORCH,
    ort_optimize: bool = False,
    dtype: torch.dtype | str | None = None,
) -> Any:
    """Load a bundle (or its ONNX export) as a diffusers pipeline on ``device``.

    Args:
        bundle: the bundle directory written by ``diffkiln optimize``; with the onnxruntime
            backend, the folder written by ``diffkiln export BUNDLE --format onnx``.
        device: "auto" (NPU, then CUDA, then CPU), "cpu", "cuda" or "npu". Default "auto".
        backend: "torch" or "onnxruntime" (:class:`Backend`). Default "torch".
        ort_optimize: onnxruntime backend only: let onnxruntime fuse the QDQ graph into its
            integer kernels. Default False (the QDQ graph as written; see
            :func:`diffkiln.runtime.onnxruntime_backend.load_onnx_pipeline`).
        dtype: torch backend only: the compute dtype of everything outside the integer layers
            (attention, norms, layers kept in FP, text encoders, VAE): torch.bfloat16 or
            torch.float16 (or their names) where the device has fast units for it (AMX/AVX-512
            BF16 CPUs, GPUs, NPUs); see :mod:`diffkiln.runtime.dtype`. Default None: as stored
            (float32).

    Returns:
        A diffusers pipeline (the class recorded in the bundle); call it as usual with prompt,
        num_inference_steps, guidance_scale and generator. Its ``diffkiln_manifest`` attribute
        holds the verified manifest.

    Raises:
        BundleError: the bundle is missing, corrupt, truncated, tampered, or of a future version.
        ValueError: an unknown backend or dtype, or a dtype with the onnxruntime backend.
    """
    from diffusers.utils import logging as dlog

    from diffkiln.runtime.dtype import COMPUTE_DTYPES, cast_float_parts

    if isinstance(dtype, str):
        if dtype not in COMPUTE_DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}; valid: {sorted(COMPUTE_DTYPES)}")
        dtype = COMPUTE_DTYPES[dtype]

    try:
        backend = Backend(backend)
    except ValueError:
        raise ValueError(f"unknown backend {backend!r}; valid: {[b.value for b in Backend]}") from None
    path = Path(bundle)
    if backend is Backend.ONNXRUNTIME:
        from diffkiln.runtime.onnxruntime_backend import load_onnx_pipeline

        if dtype is not None:
            raise ValueError("dtype applies to the torch backend; an ONNX export fixes its dtypes when exported")

        dlog.set_verbosity_error()
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        return load_onnx_pipeline(path, resolve_device(device), optimize=ort_optimize)
    manifest = read_manifest(path)
    verify_files(path, manifest)
    target = resolve_device(device)
    denoiser = build_denoiser(path, manifest)
    dlog.set_verbosity_error()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        pipe = assemble_pipeline(path, {manifest["pipeline"]["denoiser"]: denoiser})
    except InvalidInputError as exc:
        raise BundleError(f"cannot assemble the pipeline: {exc}") from None
    pipe = pipe.to(target)
    if dtype is not None:
        for component in pipe.components.values():
            if isinstance(component, nn.Module):
                cast_float_parts(component, dtype)
    pipe.diffkiln_manifest = manifest
    return pipe
