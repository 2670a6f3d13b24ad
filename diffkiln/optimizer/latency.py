"""A per-layer latency table measured on the device the bundle will run on, for a latency budget.

Each searched layer is timed at every candidate width as the runtime will run it: the integer
module built from its frozen tensors (W{b}A8, or the float layer at 16 bits), on an input of the
shape the layer sees in the FP sampler (recorded from one short pipeline call). The ILP then
bounds the summed latency of the searched layers (``MixedConfig.latency_budget_ms``).

Building the runtime modules needs :mod:`diffkiln.export` and :mod:`diffkiln.runtime`; they are
imported inside the function, only when a latency budget is asked for.
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
from diffkiln.core.hooks import scoped_hooks
from diffkiln.core.layers import find_quantizable_layers
from diffkiln.core.pipelines import find_denoiser
from diffkiln.core.plan import Plan, WeightSpec
from diffkiln.kernels.packing import PACKABLE_BITS

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


def _input_shapes(pipe: Any, stats: CalibrationStats, names: Sequence[str]) -> dict[str, torch.Size]:
    denoiser = find_denoiser(pipe)
    layers = find_quantizable_layers(denoiser)
    shapes: dict[str, torch.Size] = {}
    settings = stats.settings
    with scoped_hooks() as hooks, torch.no_grad():
        for n in names:

            def record(_m: nn.Module, args: tuple[Any, ...], _kw: dict[str, Any], name: str = n) -> None:
                shapes.setdefault(name, args[0].shape)

            hooks.add_forward_pre_hook(f"diffkiln.latency.{n}", layers[n], record)
        pipe.set_progress_bar_config(disable=True)
        pipe(
            prompt=[settings["prompts"][0]],
            num_inference_steps=2,
            guidance_scale=float(settings["guidance"]),
            output_type="latent",
            generator=torch.Generator().manual_seed(0),
            **dict(settings.get("call_kwargs", {})),
        )
    return shapes


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
        pipe: the FP pipeline.
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

    layers = find_quantizable_layers(find_denoiser(pipe))
    shapes = _input_shapes(pipe, stats, list(candidates))
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
