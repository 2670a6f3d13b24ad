"""Simulated (fake-quant) quantization of chosen layers, to *score* choices during the search.

SIMULATED: the layers keep float weights and float math; their weights are replaced by the
dequantized values of a per-channel integer grid, and their inputs by the dequantized values of
the static activation grid. This is what the search needs (hundreds of single-layer trials
without building modules); the plan it picks runs on the integer kernels of
:mod:`diffkiln.nn.qmodules`, and the final candidates are measured there.

Everything is scoped by :func:`simulated`: on exit the original weights are restored and the
named activation hooks removed, even when the body raises.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from diffkiln.calibrate.stats import CalibrationStats
from diffkiln.core.hooks import layer_input, replace_layer_input, scoped_hooks
from diffkiln.core.layers import find_quantizable_layers
from diffkiln.core.packing import PACKABLE_BITS
from diffkiln.core.plan import Plan
from diffkiln.core.quantizers import (
    ActQuantParams,
    fake_quant_activation,
    quantize_weight_grouped,
    quantize_weight_per_channel,
)
from diffkiln.core.smoothing import smoothing_factors

__all__ = ["LayerSim", "SimChoice", "layer_sims", "simulated"]


@dataclass(frozen=True)
class LayerSim:
    """What simulating one layer needs, independent of the bit-width tried.

    Attributes:
        act: the layer's static 8-bit activation grid (from the W8A8 base plan).
        smooth: SmoothQuant factors of the input channels, or None.
        bos_positions: text positions left unquantized (BOS-aware), for text inputs.
        text_len: the text length those positions refer to (0: none).
    """

    act: ActQuantParams
    smooth: torch.Tensor | None = None
    bos_positions: tuple[int, ...] = ()
    text_len: int = 0


@dataclass(frozen=True)
class SimChoice:
    """One layer's simulated format: weight bits (16: FP), activation bits (16: FP, or 8), and
    the two-level group size of 4-/2-bit weights (None: per channel)."""

    weight_bits: int = 16
    act_bits: int = 16
    group_size: int | None = None


def layer_sims(plan: Plan, stats: CalibrationStats, denoiser: nn.Module) -> dict[str, LayerSim]:
    """A LayerSim for every layer the (W8A8) base plan quantizes with static activations.

    Args:
        plan: the base plan (its activation grids, smoothing and BOS rows are reused).
        stats: the calibration statistics it was made from.
        denoiser: the FP denoiser.
    """
    layers = find_quantizable_layers(denoiser)
    sims: dict[str, LayerSim] = {}
    for lp in plan.layers:
        if lp.act is None or lp.act.scale is None or lp.act.zero_point is None:
            continue
        module = layers[lp.name]
        st = stats.layers[lp.name]
        smooth = None
        if lp.smooth_alpha is not None and isinstance(module, nn.Linear):
            smooth = smoothing_factors(st.channel_absmax.amax(dim=0), module.weight, lp.smooth_alpha)
        n_text = int(st.text_rows.shape[0]) if lp.bos_positions and st.text_rows.numel() else 0
        grid = ActQuantParams(
            lp.act.scale, lp.act.zero_point, lp.act.clip_lo or 0.0, lp.act.clip_hi or 0.0, lp.act.bits
        )
        sims[lp.name] = LayerSim(grid, smooth, lp.bos_positions if n_text else (), n_text)
    return sims


def _weight(module: nn.Module) -> torch.Tensor:
    w = module.weight
    if not isinstance(w, torch.Tensor):
        raise TypeError(f"{type(module).__name__} has no weight tensor")
    return w


def _fake_weight(module: nn.Module, bits: int, smooth: torch.Tensor | None, group_size: int | None) -> torch.Tensor:
    weight = _weight(module)
    w = weight.detach().float()
    if smooth is not None:
        w = w * smooth[None, :]
    if group_size is not None and bits in PACKABLE_BITS:
        deq = quantize_weight_grouped(w, bits, group_size, torch.float16).dequantize()
    else:
        deq = quantize_weight_per_channel(w, bits, torch.float16).dequantize()
    if smooth is not None:
        deq = deq / smooth[None, :]
    return deq.to(weight.dtype)


def _act_hook(sim: LayerSim) -> Any:
    def hook(_module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        x = layer_input(args, kwargs)
        xs = x.float() if sim.smooth is None else x.float() / sim.smooth
        q = fake_quant_activation(xs, sim.act)
        if sim.smooth is not None:
            q = q * sim.smooth
        if sim.bos_positions and x.dim() == 3 and x.shape[1] == sim.text_len:
            pos = list(sim.bos_positions)
            q[:, pos, :] = x[:, pos, :].float()  # BOS rows stay in FP, as at run time
        return replace_layer_input(args, kwargs, q.to(x.dtype))

    return hook


@contextmanager
def simulated(denoiser: nn.Module, choices: Mapping[str, SimChoice], sims: Mapping[str, LayerSim]) -> Iterator[None]:
    """Within the block, the named layers of ``denoiser`` compute as quantized (simulated).

    Args:
        denoiser: the FP denoiser (restored on exit).
        choices: layer name -> its simulated format.
        sims: layer name -> what simulating it needs (activation grids are needed only for
            layers whose ``act_bits`` is below 16).

    Raises:
        KeyError: a layer is unknown, or an activation is simulated without its LayerSim.
    """
    layers = find_quantizable_layers(denoiser)
    saved: dict[str, torch.Tensor] = {}
    try:
        with scoped_hooks() as hooks, torch.no_grad():
            for name, choice in choices.items():
                if name not in layers:
                    raise KeyError(f"no layer {name!r} in the denoiser; e.g. {list(layers)[:3]}")
                module = layers[name]
                sim = sims.get(name)
                if choice.weight_bits < 16:
                    saved[name] = _weight(module).data
                    _weight(module).data = _fake_weight(
                        module, choice.weight_bits, sim.smooth if sim else None, choice.group_size
                    )
                if choice.act_bits < 16:
                    if sim is None:
                        raise KeyError(f"{name}: no activation grid to simulate (kept in FP by the base plan)")
                    hooks.add_forward_pre_hook(f"diffkiln.simulate.{name}", module, _act_hook(sim))
            yield
    finally:
        for name, data in saved.items():
            _weight(layers[name]).data = data
