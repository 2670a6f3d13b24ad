"""A per-layer latency table measured on the device the bundle will run on, for a latency budget.

Each searched layer is timed at every candidate width as the runtime will run it: the integer
module built from its frozen tensors (W{b}A8, or the float layer at 16 bits), on an input of the
shape the layer sees in the FP sampler (recorded in the calibration's traced call). The ILP then
bounds the summed latency of the searched layers (``MixedConfig.latency_budget_ms``).

"""

from __future__ import annotations

import dataclasses
import statistics
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from diffkiln.calibrate.stats import CalibrationStats
from diffkiln.core.layers import find_quantizable_layers
from diffkiln.core.packing import PACKABLE_BITS
from diffkiln.core.pipelines import find_denoiser
from diffkiln.core.plan import Plan, WeightSpec

__all__ = ["LatencyTable", "measure_layer_latency"]


@dataclass(frozen=True)
class LatencyTable:
    """Milliseconds per call of each layer at each candidate width.

    Attributes:
        ms: layer -> bits -> median milliseconds per call.
        device: where they were measured.
    """

    ms: dict[str, dict[int, float]]
    device: str

    def total(self, bits: Mapping[str, int]) -> float:
        """The summed latency of a choice of widths.

        Raises:
            KeyError: a layer or width that was not measured.
        """
        return sum(self.ms[n][b] for n, b in bits.items() if n in self.ms)


def _input_shapes(stats: CalibrationStats, names: Sequence[str]) -> dict[str, torch.Size]:
    """Each layer's input shape in the traced sampler call (layers that never ran are left out)."""
    graph = stats.graph
    if graph is None:
        return {}
    flows = {n: graph.layers[n] for n in names if n in graph.layers}
    return {n: torch.Size(f.input_shape) for n, f in flows.items() if f.input_shape}


def _time_ms(module: nn.Module, x: torch.Tensor, repeats: int) -> float:
    with torch.no_grad():
        module(x)  # warm-up: backends prepare weights on first use
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            module(x)
            if x.device.type == "cuda":
                torch.cuda.synchronize()
            times.append((time.perf_counter() - t) * 1000.0)
    return statistics.median(times)


def measure_layer_latency(
    pipe: Any,
    base: Plan,
    stats: CalibrationStats,
    candidates: Mapping[str, Sequence[int]],
    device: str = "cpu",
    repeats: int = 5,
    group_size: int | None = None,
) -> LatencyTable:
    """Time every searched layer at every candidate width on ``device``.

    Args:
        pipe: the FP pipeline or bare module.
        base: the W8A8 base plan (activation grids, smoothing, BOS rows).
        stats: its calibration statistics.
        candidates: layer -> candidate widths (16: the float layer).
        device: where to measure, e.g. "cpu" or "cuda". Default "cpu".
        repeats: timed calls per measurement (median). Default 5.
        group_size: two-level groups for 4-/2-bit candidates, as the plan will store them.
            Default None (per channel).
    """
    from diffkiln.nn.freeze import freeze_layer, layer_meta
    from diffkiln.nn.qmodules import qmodule_for

    layers = find_quantizable_layers(find_denoiser(pipe, stats.denoiser or None))
    shapes = _input_shapes(stats, list(candidates))
    plans = {lp.name: lp for lp in base.layers}
    dev = torch.device(device)
    table: dict[str, dict[int, float]] = {}
    for name, bits_list in candidates.items():
        module = layers[name]
        x = torch.randn(shapes[name], device=dev) if name in shapes else None
        if x is None:
            continue  # never called in the sampler (e.g. an unused branch): no latency to bound
        table[name] = {}
        for bits in bits_list:
            if bits >= 16:
                runner: nn.Module = module.to(dev)
            else:
                group = group_size if bits in PACKABLE_BITS else None
                lp = dataclasses.replace(plans[name], weight=WeightSpec(bits, scale_dtype="float16", group_size=group))
                tensors = freeze_layer(module, lp, stats.layers.get(name))
                runner = qmodule_for(type(module))(tensors, layer_meta(module, lp)).to(dev)
            table[name][bits] = _time_ms(runner, x, repeats)
    return LatencyTable(table, str(dev))
