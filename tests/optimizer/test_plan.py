"""The Plan's storage sizes: LayerPlan.stored_bits_as against the tensors export writes."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from diffkiln.calibrate.stats import LayerStats
from diffkiln.core.plan import ActMode, ActSpec, LayerPlan, Plan, WeightSpec
from diffkiln.nn.freeze import freeze_layer

ACT = ActSpec(bits=8, mode=ActMode.STATIC, scale=0.05, zero_point=0)
# Tensors whose size depends on the weight format (biases and the activation grid do not).
SIZED = ("weight_q", "weight_packed", "weight_scale", "weight_group_mult", "smooth_inv", "bos_rows")

SPECS = [
    WeightSpec(8),
    WeightSpec(7, scale_dtype="float16"),
    WeightSpec(4, scale_dtype="float16"),
    WeightSpec(3, scale_dtype="float16"),
    WeightSpec(2),
    WeightSpec(4, scale_dtype="float16", group_size=16),
    WeightSpec(3, scale_dtype="float16", group_size=32),
    WeightSpec(2, scale_dtype="float16", group_size=8),
]


def _spec_id(spec: WeightSpec) -> str:
    return f"w{spec.bits}-{spec.scale_dtype}-g{spec.group_size or 0}"


def _module(kind: str) -> nn.Module:
    torch.manual_seed(0)
    # Odd input sizes, so packed rows are padded (the size must count the padding).
    return nn.Linear(45, 12) if kind == "linear" else nn.Conv2d(5, 6, 3)


@pytest.mark.parametrize("spec", SPECS, ids=_spec_id)
@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_stored_bits_equal_the_frozen_tensors(spec: WeightSpec, kind: str) -> None:
    module = _module(kind)
    weight = module.weight
    lp = LayerPlan("layer", kind, spec, ACT, params=weight.numel(), out_channels=weight.shape[0])
    tensors = freeze_layer(module, lp, None)
    written = sum(t.numel() * t.element_size() * 8 for name, t in tensors.items() if name in SIZED)
    assert lp.stored_bits() == written


def test_stored_bits_count_smoothing_and_bos_rows() -> None:
    module = _module("linear")
    k = module.in_features
    empty = torch.zeros(1, 0)
    stats = LayerStats(
        kind="linear", min=torch.zeros(1), max=torch.ones(1), channel_absmax=torch.rand(1, k) + 0.1,
        samples=empty, sample_positions=empty, text_spread=torch.zeros(7), text_rows=torch.randn(7, k),
        sample_channels=empty,
    )  # fmt: skip
    lp = LayerPlan(
        "layer", "linear", WeightSpec(4, scale_dtype="float16"), ACT, bos_positions=(0,), params=module.weight.numel(),
        smooth_alpha=0.5, out_channels=module.out_features,
    )  # fmt: skip
    tensors = freeze_layer(module, lp, stats)
    assert {"smooth_inv", "bos_rows"} <= set(tensors)
    written = sum(t.numel() * t.element_size() * 8 for name, t in tensors.items() if name in SIZED)
    assert lp.stored_bits() == written


def test_fp_layers_count_16_bits_and_old_plans_raise() -> None:
    lp = LayerPlan("layer", "linear", WeightSpec(4), ACT, params=600, out_channels=12)
    assert lp.stored_bits_as(None) == 16 * 600
    old = LayerPlan("layer", "linear", WeightSpec(4), ACT, params=600)
    with pytest.raises(ValueError, match="re-plan"):
        old.stored_bits()
    plan = Plan("mixed", {}, (lp, LayerPlan("fp", "conv", None, None, params=200, out_channels=4)))
    assert plan.avg_stored_weight_bits == pytest.approx((lp.stored_bits() + 16 * 200) / 800)
    assert plan.avg_stored_weight_bits > plan.avg_weight_bits


def test_out_channels_round_trip_and_default_for_old_plans() -> None:
    lp = LayerPlan("layer", "linear", WeightSpec(8), ACT, params=600, out_channels=12)
    plan = Plan("w8a8", {"id": "t"}, (lp,))
    assert Plan.from_json(plan.to_json()).layers[0].out_channels == 12
    d = plan.to_dict()
    del d["layers"][0]["out_channels"]
    assert Plan.from_dict(d).layers[0].out_channels == 0
