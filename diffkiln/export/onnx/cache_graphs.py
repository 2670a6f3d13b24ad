"""A block-range cache schedule (``residual``, ``deep``) in ONNX: two denoiser graphs.

* ``denoiser.onnx`` is the *fill* graph: the full denoiser, returning its output first and then the
  values reusing steps need (``cache_0``, ``cache_1``, ...): the residual the reused blocks add, per
  stream (``residual``), or each reused block's output, flattened (``deep``).
* ``denoiser_cached.onnx`` is the *reuse* graph: the denoiser's inputs plus those values; the reused
  blocks are not in it (a ``residual`` range adds its residual at its first block, a ``deep`` range
  hands back the blocks' outputs), so a reusing step really runs fewer blocks.

Both are traced through the runtime's own cache hooks (:class:`diffkiln.nn.cache.CacheStepTracer`),
so they compute what the torch runtime computes. The onnxruntime backend follows the frozen schedule
(:mod:`diffkiln.runtime.onnxruntime_backend`): it keeps the fill graph's extra outputs per CFG
branch and feeds them (extrapolated where the schedule says) to the reuse graph.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch

from diffkiln.core.cache_schedule import CacheSchedule
from diffkiln.export.onnx.check import run_check
from diffkiln.export.onnx.components import Component, _Denoiser, batch_inputs, repeated_batch, tie_batch
from diffkiln.nn.cache import CacheStepTracer

__all__ = ["CACHED_FILE", "CacheFillDenoiser", "CacheReuseDenoiser", "reuse_component"]

CACHED_FILE = "denoiser_cached.onnx"
"""The reuse graph's file in an ONNX export folder."""


class CacheFillDenoiser(_Denoiser):
    """The denoiser as a computing step: returns (output, *values to cache)."""

    tracer: CacheStepTracer

    def __init__(self, inner: _Denoiser, tracer: CacheStepTracer) -> None:
        super().__init__(inner.denoiser, inner.names, inner.options, inner.tied)
        self.__dict__["tracer"] = tracer  # plain state, not a submodule

    def forward(self, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:  # type: ignore[override]
        out, values = self.tracer.fill(lambda: _Denoiser.forward(self, *tensors))
        return (out, *values)


class CacheReuseDenoiser(_Denoiser):
    """The denoiser as a reusing step: takes its inputs then the cached values, returns its output."""

    tracer: CacheStepTracer

    def __init__(self, inner: _Denoiser, tracer: CacheStepTracer, n_cache: int, tied: tuple[int, ...]) -> None:
        super().__init__(inner.denoiser, [*inner.names, *cache_names(n_cache)], inner.options, tied)
        self.__dict__["tracer"] = tracer
        self.n_main = len(inner.names)

    def forward(self, *tensors: torch.Tensor) -> torch.Tensor:
        main, values = tensors[: self.n_main], list(tensors[self.n_main :])
        tie_batch(tensors, self.tied)
        names = self.names[: self.n_main]

        def call() -> torch.Tensor:
            out = self.denoiser(**_unflattened(dict(zip(names, main, strict=True))), **self.options,
                                return_dict=False)  # fmt: skip
            return out[0] if isinstance(out, tuple) else out

        result: torch.Tensor = self.tracer.reuse(call, values)
        return result


def _unflattened(named: dict[str, torch.Tensor]) -> dict[str, Any]:
    from diffkiln.core.arguments import unflatten_arguments

    return unflatten_arguments(named)


def cache_names(n: int) -> list[str]:
    """The graph names of ``n`` cached values, in order."""
    return [f"cache_{k}" for k in range(n)]


def reuse_component(component: Component, tracer: CacheStepTracer) -> tuple[Component, Component]:
    """(the fill component, the reuse component) of the denoiser component, with example inputs:
    the reuse graph's cached values come from the fill wrapper run on the recorded inputs."""
    inner = component.module
    assert isinstance(inner, _Denoiser)
    fill = dataclasses.replace(component, module=CacheFillDenoiser(inner, tracer))
    with torch.no_grad():
        _, *values = fill.module(*component.example.values())
    example = {**component.example, **dict(zip(cache_names(len(values)), values, strict=True))}
    # The cached values that carry the batch share it too.
    reuse = CacheReuseDenoiser(inner, tracer, len(values), batch_inputs(example))
    return fill, dataclasses.replace(component, module=reuse, example=example)


def check_reuse(path: Path, component: Component, entry: dict[str, Any]) -> dict[str, Any]:
    """Run the exported reuse graph in onnxruntime against the torch wrapper: at the recorded shapes,
    and at twice the batch when the graph's batch axis is dynamic."""
    names = list(component.example)
    check = run_check(path, names, component.module, component.example)
    if check["ok"] and entry.get("dynamic"):
        check = run_check(path, names, component.module, repeated_batch(component.example, 2))
    return check


def schedule_entry(schedule: CacheSchedule, entry: dict[str, Any], n_values: int) -> dict[str, Any]:
    """What the manifest records of the graph pair: the reuse graph's entry and the cached values."""
    return {**entry, "mechanism": schedule.mechanism.value, "cache_values": cache_names(n_values)}
