"""Freeze one float layer and its LayerPlan into the tensors a quantized module is built from."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from diffkiln.core.layers import conv_padding, layer_kind
from diffkiln.core.packing import PACKABLE_BITS, pack_weights
from diffkiln.core.plan import ActMode, LayerPlan, Plan
from diffkiln.core.quantizers import quantize_weight_grouped, quantize_weight_per_channel
from diffkiln.core.smoothing import smoothing_factors

__all__ = ["LayerInputs", "PlanInputs", "apply_plan", "freeze_layer", "layer_meta"]


class LayerInputs(Protocol):
    """What freezing a layer reads from calibration (``diffkiln.calibrate.LayerStats`` has it)."""

    @property
    def channel_absmax(self) -> torch.Tensor:
        """(T, C) largest |input| per channel per step (smoothing factors)."""

    @property
    def text_rows(self) -> torch.Tensor:
        """(L, D) the input rows of one prompt (BOS rows); empty for non-text inputs."""


class PlanInputs(Protocol):
    """Per-layer calibration inputs of a plan (``diffkiln.calibrate.CalibrationStats`` has them)."""

    @property
    def layers(self) -> Mapping[str, LayerInputs]:
        """Layer name -> its inputs."""


def layer_meta(module: nn.Module, lp: LayerPlan) -> dict[str, Any]:
    """The non-tensor construction arguments of a quantized layer (JSON-ready)."""
    meta: dict[str, Any] = {
        "act_mode": lp.act.mode.value if lp.act else None,
        "act_bits": lp.act.bits if lp.act else None,
        "weight_bits": lp.weight.bits if lp.weight else None,
        "weight_packed": bool(lp.weight and lp.weight.bits in PACKABLE_BITS),
        "weight_shape": list(module.weight.shape) if isinstance(module.weight, torch.Tensor) else None,
        "group_size": lp.weight.group_size if lp.weight else None,
        "kind": lp.kind,
    }
    if lp.output is not None:
        meta["output_bits"] = lp.output.bits
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        padding = conv_padding(module)
        if padding is None:
            raise ValueError(f"{lp.name}: padding {module.padding!r} pads unevenly; --exclude it")
        meta.update(
            stride=list(module.stride),
            padding=list(padding),
            dilation=list(module.dilation),
            groups=module.groups,
        )
    return meta


def freeze_layer(module: nn.Module, lp: LayerPlan, stats: LayerInputs | None) -> dict[str, torch.Tensor]:
    """Integer weights, scales, activation params and BOS rows for one planned layer.

    8- and 7-bit weights are stored as int8 ``weight_q`` with the float weight's shape; 4- and
    2-bit weights as uint8 ``weight_packed`` (out, ceil(in * kh * kw * bits / 8)), two or four
    codes per byte (:func:`diffkiln.core.packing.pack_weights`); grouped ones add uint8
    ``weight_group_mult`` (out, groups). Weight-only layers (no ``act``) have no activation tensors.
    Convolutions with a requantized output add ``output_scale`` float32 () and
    ``output_zero_point`` int32 ().

    Args:
        module: the float nn.Linear or nn.Conv2d.
        lp: its plan (must be quantized).
        stats: its calibration statistics (needed for BOS rows).

    Raises:
        ValueError: the plan keeps the layer in FP, or BOS rows are planned without statistics.
    """
    if lp.weight is None:
        raise ValueError(f"{lp.name} is kept in floating point by the plan; nothing to freeze")
    if layer_kind(module) is None:
        raise ValueError(f"{lp.name}: cannot quantize a {type(module).__name__}")
    assert isinstance(module.weight, torch.Tensor)  # every quantizable layer type has one
    weight = module.weight.detach().float()
    out: dict[str, torch.Tensor] = {}
    if lp.smooth_alpha is not None:
        if stats is None:
            raise ValueError(f"{lp.name}: smoothing planned but no calibration statistics given")
        factors = smoothing_factors(stats.channel_absmax.amax(dim=0), weight, lp.smooth_alpha)
        weight = weight * factors[None, :]  # (x / s) @ (W * s)^T == x @ W^T
        out["smooth_inv"] = (1.0 / factors).contiguous()
    scale_dtype = torch.float16 if lp.weight.scale_dtype == "float16" else torch.float32
    if lp.weight.group_size is not None:
        qw = quantize_weight_grouped(weight, lp.weight.bits, lp.weight.group_size, scale_dtype)
        assert qw.group_mult is not None  # a grouped quantizer always returns multipliers
        out["weight_group_mult"] = qw.group_mult.contiguous()
    else:
        qw = quantize_weight_per_channel(weight, lp.weight.bits, scale_dtype)
    if lp.weight.bits in PACKABLE_BITS:
        out["weight_packed"] = pack_weights(qw.q.reshape(qw.q.shape[0], -1), lp.weight.bits).contiguous()
    else:
        out["weight_q"] = qw.q.contiguous()
    out["weight_scale"] = qw.scale.to(scale_dtype).contiguous()
    bias = module.bias if isinstance(module.bias, torch.Tensor) else None
    if bias is not None:
        out["bias"] = bias.detach().to(torch.float32).contiguous()
    if lp.act is None:
        pass  # weight-only: activations stay in floating point
    elif lp.act.mode is ActMode.STATIC and lp.act.step_timesteps:
        # Timestep-aware: one grid per calibrated step; the runtime picks the nearest timestep's.
        out["act_scale"] = torch.tensor(lp.act.step_scales, dtype=torch.float32)
        out["act_zero_point"] = torch.tensor(lp.act.step_zero_points, dtype=torch.int32)
        out["act_timesteps"] = torch.tensor(lp.act.step_timesteps, dtype=torch.float32)
    elif lp.act.mode is ActMode.STATIC:
        out["act_scale"] = torch.tensor(lp.act.scale, dtype=torch.float32)
        out["act_zero_point"] = torch.tensor(lp.act.zero_point, dtype=torch.int32)
    if lp.output is not None:
        out["output_scale"] = torch.tensor(lp.output.scale, dtype=torch.float32)
        out["output_zero_point"] = torch.tensor(lp.output.zero_point, dtype=torch.int32)
    if lp.bos_positions:
        if stats is None or stats.text_rows.numel() == 0:
            raise ValueError(f"{lp.name}: BOS rows planned but calibration recorded no text rows")
        pos = torch.tensor(lp.bos_positions, dtype=torch.int64)
        rows = stats.text_rows[pos].to(torch.float32)
        with torch.no_grad():
            out["bos_rows"] = F.linear(rows, module.weight.float(), None if bias is None else bias.float())
        out["bos_positions"] = pos
        out["text_len"] = torch.tensor(stats.text_rows.shape[0], dtype=torch.int64)
    return out


def apply_plan(model: Any, plan: Plan, stats: PlanInputs, inplace: bool = False) -> Any:
    """``model`` (a pipeline or a bare module) with its denoiser running the plan's integer modules.

    The same freeze and the same runtime modules as a bundle, without writing one.

    Args:
        model: the FP pipeline or module.
        plan: the plan (its ``denoiser`` names the pipeline component).
        stats: the calibration statistics the plan was made from.
        inplace: swap the layers of ``model`` itself instead of a copy's (saves memory on
            full-size models). Default False.
    """
    import copy

    from diffkiln.core.layers import find_quantizable_layers
    from diffkiln.core.pipelines import find_denoiser
    from diffkiln.nn.swap import replace_layers

    qpipe = model if inplace else copy.deepcopy(model)
    den = find_denoiser(qpipe, plan.denoiser or None)
    layers = find_quantizable_layers(den)
    frozen, metas = {}, {}
    for lp in plan.layers:
        if lp.quantized:
            frozen[lp.name] = freeze_layer(layers[lp.name], lp, stats.layers.get(lp.name))
            metas[lp.name] = layer_meta(layers[lp.name], lp)
    replace_layers(den, frozen, metas)
    return qpipe
