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
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from diffkiln.core.cache_schedule import CacheSchedule
from diffkiln.export.onnx.check import run_check
from diffkiln.export.onnx.components import (
    Component,
    _Denoiser,
    batch_inputs,
    compared_outputs,
    repeated_batch,
    the_prediction,
    tie_batch,
    with_ints,
)
from diffkiln.nn.cache import CacheStepTracer

__all__ = [
    "CACHED_FILE",
    "CacheFillDenoiser",
    "CacheReuseDenoiser",
    "fill_component",
    "reuse_component",
    "reuse_inputs",
]

CACHED_FILE = "denoiser_cached.onnx"
"""The reuse graph's file in an ONNX export folder."""


class CacheFillDenoiser(_Denoiser):
    """The denoiser as a computing step: returns (its predictions, *values to cache)."""

    tracer: CacheStepTracer

    def __init__(self, inner: _Denoiser, tracer: CacheStepTracer) -> None:
        super().__init__(inner.denoiser, inner.names, inner.options, inner.tied, inner.int_inputs)
        self.__dict__["tracer"] = tracer  # plain state, not a submodule

    def forward(self, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out, values = self.tracer.fill(lambda: _Denoiser.forward(self, *tensors))
        return (*(out if isinstance(out, tuple) else (out,)), *values)

    def taking_ints(self, names: list[str], options: dict[str, Any], int_inputs: Sequence[str]) -> _Denoiser:
        return CacheFillDenoiser(super().taking_ints(names, options, int_inputs), self.tracer)


class CacheReuseDenoiser(_Denoiser):
    """The denoiser as a reusing step: takes its inputs then the cached values, returns its output."""

    tracer: CacheStepTracer

    def __init__(self, inner: _Denoiser, tracer: CacheStepTracer, n_cache: int, tied: tuple[int, ...]) -> None:
        super().__init__(inner.denoiser, [*inner.names, *cache_names(n_cache)], inner.options, tied, inner.int_inputs)
        self.__dict__["tracer"] = tracer
        self.n_main = len(inner.names)

    def forward(self, *tensors: torch.Tensor) -> Any:
        main, values = tensors[: self.n_main], list(tensors[self.n_main :])
        tie_batch(tensors, self.tied)
        names = self.names[: self.n_main]

        def call() -> Any:
            named = with_ints(dict(zip(names, main, strict=True)), self.int_inputs)
            return the_prediction(self.denoiser(**_unflattened(named), **self.options, return_dict=False))

        return self.tracer.reuse(call, values)


def _unflattened(named: dict[str, torch.Tensor]) -> dict[str, Any]:
    from diffkiln.core.arguments import unflatten_arguments

    return unflatten_arguments(named)


def cache_names(n: int) -> list[str]:
    """The graph names of ``n`` cached values, in order."""
    return [f"cache_{k}" for k in range(n)]


def fill_component(component: Component, tracer: CacheStepTracer) -> Component:
    """The denoiser component as the fill graph: its output, then the values to cache."""
    inner = component.module
    assert isinstance(inner, _Denoiser)
    return dataclasses.replace(component, module=CacheFillDenoiser(inner, tracer))


def reuse_inputs(fill: CacheFillDenoiser, example: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The reuse graph's inputs for the fill graph's ``example``: those, then the values the fill
    wrapper caches from them."""
    with torch.no_grad():
        _, values = fill.tracer.fill(lambda: _Denoiser.forward(fill, *example.values()))
    return {**example, **dict(zip(cache_names(len(values)), values, strict=True))}


def reuse_component(fill: Component) -> Component:
    """The reuse graph's component for the fill component (:func:`fill_component`; its int inputs
    too), with example inputs: the fill's, then the values it caches from them."""
    module = fill.module
    assert isinstance(module, CacheFillDenoiser)
    example = reuse_inputs(module, fill.example)
    # The cached values that carry the batch share it too.
    reuse = CacheReuseDenoiser(module, module.tracer, len(example) - len(fill.example), batch_inputs(example))
    return dataclasses.replace(fill, module=reuse, example=example)


def check_reuse(
    path: Path, component: Component, entry: dict[str, Any], other: dict[str, torch.Tensor] | None = None
) -> dict[str, Any]:
    """Run the exported reuse graph in onnxruntime against the torch wrapper: at its example and,
    where the graph is dynamic, at ``other`` (the fill graph's other checked call, with its cached
    values) or else at twice the batch."""
    names = list(component.example)
    check = run_check(path, names, component.module, component.example, compared_outputs(component))
    if check["ok"] and entry.get("dynamic"):
        other = other or repeated_batch(component.example, 2)
        check = run_check(path, names, component.module, other, compared_outputs(component))
    return check


def schedule_entry(schedule: CacheSchedule, entry: dict[str, Any], n_values: int) -> dict[str, Any]:
    """What the manifest records of the graph pair: the reuse graph's entry and the cached values."""
    return {**entry, "mechanism": schedule.mechanism.value, "cache_values": cache_names(n_values)}
