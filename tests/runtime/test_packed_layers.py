"""Packed 4-/3-/2-bit and weight-only layers: storage, resident memory, kernels against the float op."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from torch import nn

from diffkiln.core.metrics import sqnr_db
from diffkiln.core.packing import unpack_weights
from diffkiln.core.plan import ActMode, ActSpec, LayerPlan, WeightSpec
from diffkiln.core.quantizers import quantize_weight_per_channel
from diffkiln.kernels import backends as backends_mod
from diffkiln.kernels.backends import base as backends_base
from diffkiln.nn import QConv2d, QLinear
from diffkiln.nn.freeze import freeze_layer, layer_meta
from diffkiln.optimizer import SearchContext, W8A8Config
from tests.kernels.npu_emulation import make_fake_torch_npu

# weight bits, activation bits (16: weight-only)
FORMATS = [(4, 8), (3, 8), (2, 8), (4, 16), (3, 16), (2, 16), (8, 16)]


def _act_spec(x: torch.Tensor) -> ActSpec:
    lo, hi = float(x.min()), float(x.max())
    scale = (hi - lo) / 255
    return ActSpec(bits=8, mode=ActMode.STATIC, scale=scale, zero_point=round(-128 - lo / scale))


def _layer(module: nn.Module, x: torch.Tensor, wbits: int, abits: int, kind: str) -> tuple[nn.Module, torch.Tensor]:
    """The runtime module for ``module`` at (wbits, abits), and the float op on its dequantized weights."""
    lp = LayerPlan("layer", kind, WeightSpec(wbits, scale_dtype="float16"), _act_spec(x) if abits < 16 else None)
    tensors = freeze_layer(module, lp, None)
    qmod = (QLinear if kind == "linear" else QConv2d)(tensors, layer_meta(module, lp))
    w = quantize_weight_per_channel(module.weight, wbits, torch.float16).dequantize()
    xin = x
    if abits < 16:  # the same activation grid, simulated, for the float reference
        a = lp.act
        assert a is not None and a.scale is not None and a.zero_point is not None
        q = torch.clamp(torch.round(x / a.scale) + a.zero_point, -128, 127)
        xin = (q - a.zero_point) * a.scale
    ref = nn.functional.linear(xin, w, module.bias) if kind == "linear" else module._conv_forward(xin, w, module.bias)
    return qmod, ref


@pytest.mark.parametrize(("wbits", "abits"), FORMATS, ids=lambda v: str(v))
@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_packed_layer_matches_float_op_on_dequantized_weights(wbits: int, abits: int, kind: str) -> None:
    torch.manual_seed(0)
    if kind == "linear":
        module: nn.Module = nn.Linear(72, 40)
        x = torch.randn(3, 17, 72)
    else:
        module = nn.Conv2d(12, 20, 3, padding=1)
        x = torch.randn(2, 12, 9, 9)
    qmod, ref = _layer(module, x, wbits, abits, kind)
    with torch.no_grad():
        out = qmod(x)
    # Same integers, same scales: the only difference is float summation order.
    assert sqnr_db(ref.detach(), out) >= 60.0


@pytest.mark.parametrize("wbits", [4, 3, 2])
def test_sub_byte_weights_stay_packed_in_memory(wbits: int) -> None:
    module = nn.Linear(256, 128)
    x = torch.randn(4, 256)
    qmod, _ = _layer(module, x, wbits, 8, "linear")
    assert qmod.weight_t is None and qmod.weight_packed is not None
    assert qmod.weight_packed.dtype == torch.uint8
    assert qmod.weight_packed.numel() == 128 * 256 * wbits // 8
    qmod(x)  # running it must not leave an unpacked copy behind
    resident = sum(b.numel() * b.element_size() for b in qmod.buffers())
    int8_bytes = 128 * 256
    assert resident < int8_bytes * wbits / 8 + 128 * 4 * 3  # packed codes + fp32 scale/bias/act params
    assert not qmod._packed  # no backend prepack holding int8 weights


def test_freeze_packs_codes_bit_exactly() -> None:
    module = nn.Linear(37, 5)  # an odd row length exercises the padding of the last byte
    lp = LayerPlan("l", "linear", WeightSpec(4), None)
    t = freeze_layer(module, lp, None)
    codes = unpack_weights(t["weight_packed"], 4, 37)
    assert torch.equal(codes, quantize_weight_per_channel(module.weight, 4).q)
    assert "act_scale" not in t


@pytest.fixture
def fake_npu(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setitem(sys.modules, "torch_npu", make_fake_torch_npu())
    monkeypatch.setattr(backends_base, "_INSTANCES", {})
    return backends_mod.NpuBackend()


@pytest.mark.parametrize(("bits", "n"), [(4, 64), (4, 20), (2, 64), (8, 48)], ids=lambda v: str(v))
def test_npu_weight_only_matmul_on_emulated_torch_npu(fake_npu, bits: int, n: int) -> None:
    torch.manual_seed(1)
    w = torch.randn(n, 96)
    q = quantize_weight_per_channel(w, bits, torch.float16)
    x = torch.randn(10, 96)
    out = fake_npu.weight_only_matmul(x, q.q.t().contiguous(), q.scale, None, bits)
    ref = x @ q.dequantize().t()
    assert out.dtype == torch.float32
    assert sqnr_db(ref, out) >= 40.0  # float16 inputs on the NPU path


def test_mixed_bundle_round_trips_packed_tensors_bit_exactly(random_shapes_pipelines, tmp_path: Path) -> None:
    from diffkiln.runtime.inspect import summarize
    from tests.runtime_e2e_helpers import build_bundle

    pipe = random_shapes_pipelines["unet"]
    bundle, plan = build_bundle(pipe, W8A8Config(), tmp_path / "w8")
    layers = []
    for i, lp in enumerate(plan.layers):
        if lp.quantized:
            bits = (4, 2, 8, 3)[i % 4]
            lp = dataclasses.replace(lp, weight=WeightSpec(bits, scale_dtype="float16"))
        layers.append(lp)
    mixed_plan = dataclasses.replace(plan, layers=tuple(layers))
    from diffkiln.calibrate import CalibrationConfig, calibrate
    from diffkiln.export import ExportConfig, FloatStorage, export_bundle
    from diffkiln.runtime import load
    from tests.runtime_e2e_helpers import CACHE, PROMPTS

    stats = calibrate(pipe, CalibrationConfig(PROMPTS, steps=4, batch_size=4, cache_dir=CACHE, progress=False))
    out = export_bundle(pipe, mixed_plan, stats, ExportConfig(tmp_path / "mixed", float_storage=FloatStorage.FLOAT16))
    qpipe = load(out, device="cpu")
    manifest = qpipe.diffkiln_manifest
    # 3-bit layers need format version 3; bundles without them stay at 2 for older runtimes.
    assert manifest["version"] == 3 and load(bundle, device="cpu").diffkiln_manifest["version"] == 2
    with safe_open(str(out / manifest["quant"]["weights_file"]), "pt") as f:
        for name, info in manifest["quant"]["layers"].items():
            if info["bits"] in (2, 3, 4):
                stored = f.get_tensor(f"{name}::weight_packed")
                module = qpipe.unet.get_submodule(name)
                assert info["packed"] and torch.equal(module.weight_packed, stored)
    summary = summarize(out)
    w8 = summarize(bundle)
    assert summary["denoiser_fp16_bytes"] == w8["denoiser_fp16_bytes"]
    assert summary["denoiser_bytes"] < 0.75 * w8["denoiser_bytes"]


def test_float16_storage_shrinks_a_w8a8_bundle_and_keeps_its_outputs(random_shapes_pipelines, tmp_path: Path) -> None:
    from diffkiln.calibrate import CalibrationConfig, calibrate
    from diffkiln.export import ExportConfig, FloatStorage, export_bundle
    from diffkiln.optimizer import make_plan
    from diffkiln.runtime import load
    from diffkiln.runtime.inspect import summarize
    from tests.runtime_e2e_helpers import CACHE, PROMPTS, latents

    pipe = random_shapes_pipelines["dit"]
    stats = calibrate(pipe, CalibrationConfig(PROMPTS, steps=4, batch_size=4, cache_dir=CACHE, progress=False))
    plan = make_plan(pipe, stats, W8A8Config(), SearchContext(source_id="t"))
    exact = export_bundle(pipe, plan, stats, ExportConfig(tmp_path / "a"))
    half_plan = make_plan(pipe, stats, W8A8Config(scale_dtype="float16"), SearchContext(source_id="t"))
    half = export_bundle(pipe, half_plan, stats, ExportConfig(tmp_path / "b", float_storage=FloatStorage.FLOAT16))
    with safe_open(str(half / "transformer" / "quantized.safetensors"), "pt") as f:
        dtypes = {f.get_slice(k).get_dtype() for k in f.keys() if k.endswith(("::weight_scale", "::bias"))}  # noqa: SIM118
    assert dtypes == {"F16"}
    assert summarize(half)["denoiser_bytes"] < 0.95 * summarize(exact)["denoiser_bytes"]
    # float16 scales, biases and norms, as an FP16 checkpoint: close to the exact bundle's output.
    assert sqnr_db(latents(load(exact, "cpu"), PROMPTS[:1]), latents(load(half, "cpu"), PROMPTS[:1])) >= 30.0


@pytest.mark.parametrize("abits", [8, 16], ids=["w4a8", "w4a16"])
@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_grouped_layer_matches_float_op_and_stays_packed(kind: str, abits: int) -> None:
    from diffkiln.core.quantizers import quantize_weight_grouped

    torch.manual_seed(0)
    module: nn.Module = nn.Linear(96, 40) if kind == "linear" else nn.Conv2d(16, 24, 3, padding=1)
    x = torch.randn(3, 17, 96) if kind == "linear" else torch.randn(2, 16, 9, 9)
    act = _act_spec(x) if abits < 16 else None
    lp = LayerPlan("layer", kind, WeightSpec(4, scale_dtype="float16", group_size=32), act)
    tensors = freeze_layer(module, lp, None)
    assert tensors["weight_group_mult"].dtype == torch.uint8 and "weight_q" not in tensors
    qmod = (QLinear if kind == "linear" else QConv2d)(tensors, layer_meta(module, lp))
    assert qmod.weight_t is None and qmod.code_bits == 8 and "groups of 32" in qmod.format_name()
    w = quantize_weight_grouped(module.weight, 4, 32, torch.float16).dequantize()
    xin = x
    if act is not None:
        assert act.scale is not None and act.zero_point is not None
        q = torch.clamp(torch.round(x / act.scale) + act.zero_point, -128, 127)
        xin = (q - act.zero_point) * act.scale
    with torch.no_grad():
        ref = (
            nn.functional.linear(xin, w, module.bias) if kind == "linear" else module._conv_forward(xin, w, module.bias)
        )
        out = qmod(x)
    assert sqnr_db(ref, out) >= 60.0
    resident = sum(b.numel() * b.element_size() for b in qmod.buffers())
    assert resident < w.numel() // 2 + w.shape[0] * (w[0].numel() // 32 + 1) + 40 * 4 * 4  # codes + mults + scales


@pytest.mark.skipif(not backends_mod.onednn_available(), reason="oneDNN's quantized ops are not in this torch build")
@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_onednn_prepacked_layers_keep_one_int8_copy(kind: str) -> None:
    """7-bit activations take oneDNN's prepacked path on every x86 CPU; the portable codes are then
    released, recovered bit-exactly from the prepacked copy, and counted once as resident."""
    from diffkiln.runtime.memory import resident_bytes

    torch.manual_seed(0)
    module: nn.Module = nn.Linear(96, 64) if kind == "linear" else nn.Conv2d(16, 24, 3, padding=1)
    x = torch.randn(5, 96) if kind == "linear" else torch.randn(2, 16, 8, 8)
    lo, hi = float(x.min()), float(x.max())
    scale = (hi - lo) / 127
    act = ActSpec(bits=7, mode=ActMode.STATIC, scale=scale, zero_point=round(-64 - lo / scale))
    lp = LayerPlan("layer", kind, WeightSpec(8), act)
    qmod = (QLinear if kind == "linear" else QConv2d)(freeze_layer(module, lp, None), layer_meta(module, lp))
    codes = qmod.codes_t().clone()
    holder = nn.Module()
    holder.add_module("q", qmod)
    with torch.no_grad():
        first = qmod(x)
        assert qmod.weight_t is None, "the portable int8 copy should be released after prepacking"
        assert torch.equal(qmod.codes_t(), codes)
        assert torch.equal(qmod(x), first)
    n_weights = codes.numel()
    # One int8 byte per weight plus per-channel scales/bias (float16 in the layer, float32 in oneDNN's copy).
    assert n_weights <= resident_bytes(holder) < n_weights + 16 * codes.shape[1] + 4096


def test_auto_scale_dtype_takes_float16_where_it_is_exact(random_shapes_pipelines, tmp_path: Path) -> None:
    import copy

    from diffkiln.calibrate import CalibrationConfig, calibrate
    from diffkiln.export import ExportConfig, export_bundle
    from diffkiln.optimizer import make_plan
    from tests.runtime_e2e_helpers import CACHE, PROMPTS

    pipe = copy.deepcopy(random_shapes_pipelines["dit"])
    stats = calibrate(pipe, CalibrationConfig(PROMPTS, steps=4, batch_size=4, cache_dir=CACHE, progress=False))
    tiny = "transformer_blocks.0.attn.to_q"
    with torch.no_grad():  # scales of 1e-6: below float16's normal range
        pipe.transformer.get_submodule(tiny).weight.mul_(1e-6 / pipe.transformer.get_submodule(tiny).weight.abs().max())
    plan = make_plan(pipe, stats, W8A8Config(), SearchContext(source_id="t"))
    dtypes = {lp.name: lp.weight.scale_dtype for lp in plan.layers if lp.weight is not None}
    assert dtypes.pop(tiny) == "float32" and set(dtypes.values()) == {"float16"}
    bundle = export_bundle(pipe, plan, stats, ExportConfig(tmp_path / "b"))
    with safe_open(str(bundle / "transformer" / "quantized.safetensors"), "pt") as f:
        stored = {k.partition("::")[0]: f.get_slice(k).get_dtype() for k in f.keys() if k.endswith("::weight_scale")}  # noqa: SIM118
    assert stored.pop(tiny) == "F32" and set(stored.values()) == {"F16"}
