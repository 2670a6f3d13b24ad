"""``diffkiln.runtime.load``: a bundle -> a diffusers pipeline whose denoiser runs integer kernels.

Loading checks the manifest's schema and version and every file's size and sha256 before using
anything, reads tensors with safetensors and metadata with JSON only (never unpickles), and
builds the denoiser without its float weights: the architecture is created on the meta device
(but for the buffers its constructor rebuilds, which are checked against the bundle's
fingerprints), quantized layers are built from int8 tensors, and the remaining tensors are
assigned from the bundle.
"""

from __future__ import annotations

import os
from enum import Enum
from pathlib import Path
from typing import Any

import torch
from torch import nn

from diffkiln.core.cache_schedule import CacheSchedule, CacheScheduleError
from diffkiln.core.devices import resolve_device
from diffkiln.core.errors import BundleError, InvalidInputError
from diffkiln.core.sparse_plan import SparsePlan, SparsePlanError
from diffkiln.kernels.sparse_attention import SparseKernel
from diffkiln.nn.cache import apply_cache_schedule
from diffkiln.nn.sparse_attention import apply_sparse_plan
from diffkiln.runtime.parallel import ParallelConfig, apply_parallel
from diffkiln.runtime.reader import open_bundle
from diffkiln.runtime.save import bundle_pipeline_class

__all__ = ["Backend", "is_bundle", "load", "resolve_device"]  # resolve_device: from diffkiln.core.devices


def is_bundle(path: str | os.PathLike[str]) -> bool:
    """True when ``path`` is a directory holding a diffkiln manifest (not yet verified)."""
    return (Path(path) / "manifest.json").is_file()


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
    cache: bool = True,
    sparse: bool = True,
    sparse_kernel: str = "auto",
    parallel: ParallelConfig | None = None,
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
        cache: apply the bundle's (or ONNX export's) frozen cache schedule, when it has one
            (:mod:`diffkiln.nn.cache`). False runs every step in full. Default True.
        sparse: torch backend: run the bundle's frozen sparse-attention masks, when it has them
            (:mod:`diffkiln.nn.sparse_attention`). False runs attention dense. Default True.
        sparse_kernel: the kernel the masks run on: "auto", "gather" or "flex"
            (:class:`~diffkiln.kernels.sparse_attention.SparseKernel`). Default "auto".
        parallel: torch backend: run over the ranks of a torch.distributed process group (launch
            with torchrun; :mod:`diffkiln.runtime.parallel`): ``ParallelConfig(cfg=True)`` splits
            each denoiser call's batch, CFG's two branches, over the ranks. Default None: one process.

    Returns:
        A diffusers pipeline (the class recorded in the bundle, whose ``save_pretrained`` writes a
        bundle: :mod:`diffkiln.runtime.save`); call it as usual with prompt,
        num_inference_steps, guidance_scale and generator. Its ``diffkiln_manifest`` attribute
        holds the verified manifest; ``diffkiln_experts`` the quantized experts beside the
        denoiser (Wan 2.2's ``transformer_2``) by name, or an empty dict; ``diffkiln_cache`` the
        applied schedule's run state and counts (:class:`~diffkiln.nn.cache.CacheRun`), or None;
        ``diffkiln_sparse`` the applied masks' run state with the density measured as they ran
        (:class:`~diffkiln.nn.sparse_attention.SparseRun`), or None; ``diffkiln_parallel`` the
        split and whole calls (:class:`~diffkiln.runtime.parallel.ParallelRun`),
        or None.

    Raises:
        BundleError: the bundle is missing, corrupt, truncated, tampered, of a future version, or
            its cache schedule or sparse masks are malformed or name blocks its denoiser lacks.
        InvalidInputError: an unknown backend, dtype or sparse kernel, or a dtype with the onnxruntime backend.
    """
    from diffusers.utils import logging as dlog

    from diffkiln.runtime.dtype import COMPUTE_DTYPES, cast_float_parts

    if isinstance(dtype, str):
        if dtype not in COMPUTE_DTYPES:
            raise InvalidInputError(f"unknown dtype {dtype!r}; valid: {sorted(COMPUTE_DTYPES)}")
        dtype = COMPUTE_DTYPES[dtype]

    try:
        backend = Backend(backend)
    except ValueError:
        raise InvalidInputError(f"unknown backend {backend!r}; valid: {[b.value for b in Backend]}") from None
    if sparse_kernel not in {k.value for k in SparseKernel}:
        raise InvalidInputError(f"unknown sparse_kernel {sparse_kernel!r}; valid: {[k.value for k in SparseKernel]}")
    path = Path(bundle)
    if backend is Backend.ONNXRUNTIME:
        from diffkiln.runtime.onnxruntime_backend import load_onnx_pipeline

        if dtype is not None:
            raise InvalidInputError("dtype applies to the torch backend; an ONNX export fixes its dtypes when exported")
        if parallel is not None:
            raise InvalidInputError(
                "parallel applies to the torch backend; load the bundle itself to run it over ranks"
            )

        dlog.set_verbosity_error()
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        return load_onnx_pipeline(path, resolve_device(device), optimize=ort_optimize, cache=cache)
    target = resolve_device(device)
    dlog.set_verbosity_error()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    loaded = open_bundle(path)
    manifest = loaded.manifest
    pipe = loaded.pipeline.to(target)
    if dtype is not None:
        for component in pipe.components.values():
            if isinstance(component, nn.Module):
                cast_float_parts(component, dtype)
    pipe.diffkiln_manifest = manifest
    # save_pretrained writes a bundle (diffkiln.runtime.save), not a folder diffusers would misread
    pipe.__class__ = bundle_pipeline_class(type(pipe))
    pipe.diffkiln_source = path
    pipe.diffkiln_denoiser = loaded.denoiser
    pipe.diffkiln_experts = loaded.experts
    pipe.diffkiln_cache = None
    if cache and manifest.get("cache"):
        try:
            schedule = CacheSchedule.from_dict(manifest["cache"])
            denoiser = getattr(pipe, manifest["pipeline"]["denoiser"])
            pipe.diffkiln_cache = apply_cache_schedule(denoiser, schedule, getattr(pipe, "scheduler", None))
        except CacheScheduleError as exc:
            raise BundleError(f"{path}: the manifest's cache schedule: {exc}") from None
    pipe.diffkiln_sparse = None
    if sparse and manifest.get("sparsity"):
        try:
            masks = SparsePlan.from_dict(manifest["sparsity"])
            denoiser = getattr(pipe, manifest["pipeline"]["denoiser"])
            pipe.diffkiln_sparse = apply_sparse_plan(denoiser, masks, getattr(pipe, "scheduler", None),
                                                     SparseKernel(sparse_kernel))  # fmt: skip
        except SparsePlanError as exc:
            raise BundleError(f"{path}: the manifest's sparse-attention masks: {exc}") from None
    pipe.diffkiln_parallel = None
    if parallel is not None:  # last: its split wraps the cache and sparse hooks
        denoiser = getattr(pipe, manifest["pipeline"]["denoiser"])
        # A cache schedule follows a split sequence (each rank caches its own tokens' values; measured
        # bit-identical). Sparse masks index token blocks of the whole sequence: Ulysses gives each
        # rank the whole sequence for a share of the heads, which the masks follow; ring attention
        # splits the sequence inside attention, which they do not.
        sparse_run = pipe.diffkiln_sparse
        if sparse_run is not None and parallel.ring_degree > 1:
            raise InvalidInputError(
                "ring attention splits the sequence inside attention, which this bundle's sparse-attention masks "
                "(per token block of the whole sequence) do not follow; use ulysses_degree, load with "
                "sparse=False, or use ParallelConfig(cfg=True)"
            )
        pipe.diffkiln_parallel = apply_parallel(denoiser, parallel, target)
        for expert in loaded.experts.values():  # Wan 2.2's transformer_2 runs its steps over the ranks too
            apply_parallel(expert, parallel, target, pipe.diffkiln_parallel)
        if parallel.context_degree > 1 and sparse_run is not None:
            sparse_run.head_share = (pipe.diffkiln_parallel.rank, parallel.ulysses_degree)
    return pipe
