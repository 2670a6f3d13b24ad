"""Integer kernels against their pure-torch references and against the float op."""

from __future__ import annotations

import sys
from typing import Any

import pytest
import torch

from diffkiln.core.metrics import sqnr_db
from diffkiln.kernels import (
    available_backends,
    dynamic_quant,
    dynamic_quant_per_token_reference,
    get_backend,
    int_mm,
    int_mm_reference,
    quant_matmul,
    quant_matmul_reference,
)
from diffkiln.kernels import backends as backends_mod
from diffkiln.kernels.backends import base as backends_base
from tests.kernels.npu_emulation import make_fake_torch_npu

SHAPES = [(1, 8, 8), (17, 64, 32), (77, 320, 640), (5, 33, 7), (9, 2500, 24)]


def _rand_int8(*shape: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-128, 128, shape, generator=g, dtype=torch.int8)


@pytest.mark.parametrize(("m", "k", "n"), SHAPES, ids=lambda v: str(v))
def test_cpu_int_mm_is_bit_exact(m: int, k: int, n: int) -> None:
    a, b = _rand_int8(m, k, seed=1), _rand_int8(k, n, seed=2)
    assert torch.equal(int_mm(a, b), int_mm_reference(a, b))


def _quantize_problem(m: int, k: int, n: int):
    g = torch.Generator().manual_seed(m * 1000 + k)
    x = torch.randn(m, k, generator=g)
    w = torch.randn(n, k, generator=g) * 0.05
    b = torch.randn(n, generator=g) * 0.1
    w_scale = w.abs().amax(1) / 127
    w_q = torch.round(w / w_scale[:, None]).clamp(-128, 127).to(torch.int8)
    x_scale = x.abs().amax() / 127
    x_q = torch.round(x / x_scale).clamp(-128, 127).to(torch.int8)
    scale = (x_scale * w_scale).float()
    bias = torch.round(b / scale).to(torch.int32)
    dequant_ref = (x_q.float() * x_scale) @ (w_q.float() * w_scale[:, None]).T + bias.float() * scale
    return x_q, w_q.T.contiguous(), scale, bias, dequant_ref


@pytest.mark.parametrize(("m", "k", "n"), SHAPES, ids=lambda v: str(v))
def test_quant_matmul_matches_float_op_on_dequantized_tensors(m: int, k: int, n: int) -> None:
    x_q, w_t, scale, bias, dequant_ref = _quantize_problem(m, k, n)
    out = quant_matmul(x_q, w_t, scale, bias)
    assert sqnr_db(dequant_ref, out) >= 40.0
    assert torch.allclose(out, quant_matmul_reference(x_q, w_t, scale, bias), rtol=1e-6, atol=1e-6)


def test_dynamic_quant_per_token_round_trips() -> None:
    x = torch.randn(9, 40) * torch.linspace(0.1, 10, 9)[:, None]
    q, s = dynamic_quant(x)
    assert q.dtype == torch.int8 and s.shape == (9,)
    assert sqnr_db(x, q.float() * s[:, None]) >= 35.0
    rq, rs = dynamic_quant_per_token_reference(x)
    assert torch.equal(q, rq) and torch.equal(s, rs)


def test_unknown_backend_lists_valid_ones() -> None:
    with pytest.raises(KeyError, match="valid"):
        get_backend("meta")
    assert {"cpu", "cuda", "npu"} <= set(available_backends())


@pytest.fixture
def fake_npu(monkeypatch: pytest.MonkeyPatch):
    """The npu backend with torch_npu emulated on CPU (scoped: removed after the test)."""
    monkeypatch.setitem(sys.modules, "torch_npu", make_fake_torch_npu())
    monkeypatch.setattr(backends_base, "_INSTANCES", {})
    return backends_mod.NpuBackend()


@pytest.mark.parametrize(("m", "k", "n"), SHAPES, ids=lambda v: str(v))
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_npu_backend_on_emulated_torch_npu(fake_npu, m: int, k: int, n: int, out_dtype: torch.dtype) -> None:
    x_q, w_t, scale, bias, dequant_ref = _quantize_problem(m, k, n)
    out = fake_npu.quant_matmul(x_q, w_t, scale, bias, None, out_dtype)
    assert out.dtype == out_dtype
    # bfloat16 output keeps ~8 bits of mantissa: SQNR about 45-50 dB against the float op.
    assert sqnr_db(dequant_ref, out.float()) >= 40.0
    q, s = fake_npu.dynamic_quant(dequant_ref)
    rq, rs = dynamic_quant_per_token_reference(dequant_ref)
    assert torch.equal(q, rq) and torch.allclose(s, rs)


def test_npu_backend_without_torch_npu_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "torch_npu", None)
    with pytest.raises(RuntimeError, match="diffkiln\\[npu\\]"):
        backends_mod.NpuBackend()


@pytest.mark.gpu
@pytest.mark.parametrize(("m", "k", "n"), SHAPES, ids=lambda v: str(v))
def test_cuda_int_mm_is_bit_exact(m: int, k: int, n: int) -> None:
    a, b = _rand_int8(m, k, seed=1), _rand_int8(k, n, seed=2)
    assert torch.equal(int_mm(a.cuda(), b.cuda()).cpu(), int_mm_reference(a, b))


# (weight bits, activation bits): the full grid, and the two grids that keep oneDNN exact on AVX2.
GRIDS = {"w8a8": (8, 8), "w8a7": (8, 7), "w7a8": (7, 8)}


def _quantized_operands(w: torch.Tensor, x: torch.Tensor, wbits: int, abits: int) -> tuple[Any, ...]:
    from diffkiln.kernels import ActGrid

    qmax = 2 ** (wbits - 1) - 1
    dims = tuple(range(1, w.dim()))
    ws = w.abs().amax(dims) / qmax
    wq = torch.round(w / ws.view(-1, *([1] * len(dims)))).clamp(-qmax, qmax).to(torch.int8)
    act = ActGrid(float(x.abs().max()) * 2 / (2**abits - 1), -3, abits)
    xq = act.quantize(x).float()
    return wq, ws, act, (xq - act.zero_point) * act.scale, wq.float() * ws.view(-1, *([1] * len(dims)))


def _onednn_usable(wq: torch.Tensor, act: Any) -> bool:
    from diffkiln.kernels.backends import onednn_exact

    return onednn_exact(wq, act)


@pytest.mark.parametrize(("m", "k", "n"), SHAPES, ids=lambda v: str(v))
@pytest.mark.parametrize("grid", list(GRIDS))
@pytest.mark.parametrize("impl", ["fastest", "generic", "onednn"])
def test_prepacked_static_linear_matches_float_op_on_dequantized_tensors(
    m: int, k: int, n: int, grid: str, impl: str
) -> None:
    from diffkiln.kernels import prepack_static_linear
    from diffkiln.kernels.backends import GenericStaticLinear, OneDnnStaticLinear

    g = torch.Generator().manual_seed(k)
    x = torch.randn(m, k, generator=g)
    w = torch.randn(n, k, generator=g) * 0.05
    b = torch.randn(n, generator=g)
    wq, ws, act, x_dq, w_dq = _quantized_operands(w, x, *GRIDS[grid])
    if impl == "onednn" and not _onednn_usable(wq, act):
        pytest.skip("oneDNN's u8s8 kernel is not exact for this grid on this CPU")
    lin = {
        "fastest": lambda: prepack_static_linear(wq, ws, b, act, "cpu"),
        "generic": lambda: GenericStaticLinear(get_backend("cpu"), wq, ws, b, act),
        "onednn": lambda: OneDnnStaticLinear(wq, ws, b, act),
    }[impl]()
    ref = x_dq @ w_dq.T + b
    # Exact integer math leaves only float rounding of the scales (> 100 dB measured); a saturating
    # kernel measures about 20 dB, so 80 dB separates the two.
    assert sqnr_db(ref, lin(x)) >= 80.0


def test_the_fastest_path_on_avx2_is_onednn_exactly_when_a_grid_is_7_bit() -> None:
    from diffkiln.kernels import prepack_static_linear
    from diffkiln.kernels.backends import OneDnnStaticLinear, cpu_has_vnni, onednn_available

    if not onednn_available():
        pytest.skip("this torch build has no oneDNN int8 kernels")
    x, w = torch.randn(16, 64), torch.randn(32, 64)
    for grid, (wbits, abits) in GRIDS.items():
        wq, ws, act, _, _ = _quantized_operands(w, x, wbits, abits)
        fast = isinstance(prepack_static_linear(wq, ws, None, act, "cpu"), OneDnnStaticLinear)
        assert fast == (cpu_has_vnni() or grid != "w8a8"), grid


CONVS = {
    "3x3-s1": dict(c=16, o=24, k=3, stride=1, padding=1, hw=12),
    "3x3-s2": dict(c=16, o=8, k=3, stride=2, padding=1, hw=13),
    "1x1": dict(c=32, o=16, k=1, stride=1, padding=0, hw=9),
}


@pytest.mark.parametrize("conv", list(CONVS))
@pytest.mark.parametrize("grid", list(GRIDS))
def test_direct_static_conv_matches_float_conv_on_dequantized_tensors(conv: str, grid: str) -> None:
    import torch.nn.functional as F

    from diffkiln.kernels import ConvGeometry, prepack_static_conv

    c = CONVS[conv]
    g = torch.Generator().manual_seed(7)
    x = torch.randn(2, c["c"], c["hw"], c["hw"], generator=g)
    w = torch.randn(c["o"], c["c"], c["k"], c["k"], generator=g) * 0.1
    b = torch.randn(c["o"], generator=g)
    wq, ws, act, x_dq, w_dq = _quantized_operands(w, x, *GRIDS[grid])
    geo = ConvGeometry((c["stride"],) * 2, (c["padding"],) * 2, (1, 1))
    direct = prepack_static_conv(wq, ws, b, act, geo, "cpu")
    if direct is None:
        assert not _onednn_usable(wq, act)  # no exact direct kernel: the layer uses im2col + GEMM
        pytest.skip("no exact direct integer convolution for this grid on this CPU")
    ref = F.conv2d(x_dq, w_dq, b, stride=c["stride"], padding=c["padding"])
    assert sqnr_db(ref, direct(x)) >= 80.0


@pytest.mark.parametrize("k", [1, 1024, 1025, 4096], ids=lambda k: f"K{k}")
def test_int_mm_on_fp32_units_is_bit_exact_at_extreme_values(k: int) -> None:
    from diffkiln.kernels.backends import int_mm_on_fp32_units

    # Worst case for float32 exactness: every product at its extreme, all of one sign.
    a = torch.full((3, k), -128, dtype=torch.int8)
    b = torch.full((k, 5), -128, dtype=torch.int8)
    assert torch.equal(int_mm_on_fp32_units(a, b), int_mm_reference(a, b))
    a2, b2 = _rand_int8(4, k, seed=k), _rand_int8(k, 6, seed=k + 1)
    assert torch.equal(int_mm_on_fp32_units(a2, b2), int_mm_reference(a2, b2))


@pytest.mark.parametrize("kind", ["linear", "conv"])
@pytest.mark.parametrize("impl", ["generic", "onednn"])
def test_a_call_time_grid_overrides_the_prepacked_one(kind: str, impl: str) -> None:
    """Timestep-aware layers prepack once and quantize each step on that step's grid."""
    import torch.nn.functional as F

    from diffkiln.kernels import ActGrid, ConvGeometry, prepack_static_conv
    from diffkiln.kernels.backends import GenericStaticLinear, OneDnnStaticLinear

    g = torch.Generator().manual_seed(11)
    x = torch.randn(2, 16, 9, 9, generator=g) if kind == "conv" else torch.randn(40, 64, generator=g)
    w = torch.randn(24, 16, 3, 3, generator=g) * 0.1 if kind == "conv" else torch.randn(24, 64, generator=g) * 0.1
    b = torch.randn(24, generator=g)
    wq, ws, packed_grid, _, w_dq = _quantized_operands(w, x, 8, 7)
    step_grid = ActGrid(packed_grid.scale * 0.6, 5, 7)  # another step's range, same bits
    if impl == "onednn" and not _onednn_usable(wq, packed_grid):
        pytest.skip("oneDNN's u8s8 kernel is not exact for this grid on this CPU")
    x_dq = (step_grid.quantize(x).float() - step_grid.zero_point) * step_grid.scale
    if kind == "linear":
        lin = (OneDnnStaticLinear if impl == "onednn" else lambda *a: GenericStaticLinear(get_backend("cpu"), *a))(
            wq, ws, b, packed_grid
        )
        ref, out = x_dq @ w_dq.T + b, lin(x, step_grid)
    else:
        if impl == "generic":
            pytest.skip("convolutions without a direct kernel use im2col + the linear path")
        conv = prepack_static_conv(wq, ws, b, packed_grid, ConvGeometry((1, 1), (1, 1), (1, 1)), "cpu")
        assert conv is not None
        ref, out = F.conv2d(x_dq, w_dq, b, padding=1), conv(x, step_grid)
    assert sqnr_db(ref, out) >= 80.0


@pytest.mark.parametrize("bits", [4, 2])
@pytest.mark.parametrize("stride", [1, 2])
def test_conv_on_fp32_units_is_bit_exact_for_sub_byte_weights(bits: int, stride: int) -> None:
    from diffkiln.kernels.backends import ActGrid, ConvGeometry, conv2d_on_fp32_units

    gen = torch.Generator().manual_seed(bits + stride)
    qmax = 2 ** (bits - 1) - 1
    w = torch.randint(-qmax, qmax + 1, (6, 5, 3, 3), generator=gen, dtype=torch.int8)
    x = torch.randn(2, 5, 8, 8, generator=gen)
    act, geo = ActGrid(0.03, -7), ConvGeometry((stride, stride), (1, 1), (1, 1))
    scale = torch.ones(6)
    out = conv2d_on_fp32_units(x, w, scale, None, act, geo)
    assert out is not None
    # Reference: exact int64 arithmetic on the same codes (padding with code - zero point = 0).
    codes = (act.quantize(x, 0, torch.int64) - act.zero_point).to(torch.float64)
    ref = torch.nn.functional.conv2d(codes, w.to(torch.float64), stride=stride, padding=1) * act.scale
    assert torch.equal(torch.round(out.double() / act.scale), torch.round(ref / act.scale))
    wide = torch.full((6, 4000, 3, 3), qmax, dtype=torch.int8)
    assert conv2d_on_fp32_units(torch.zeros(1, 4000, 3, 3), wide, scale, None, act, geo) is None or bits == 2


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_onednn_writes_bfloat16_for_bfloat16_activations_bit_identically(kind: str) -> None:
    """With bfloat16 float parts (load(..., dtype="bfloat16")) oneDNN writes bfloat16 directly:
    the same values as its float32 output cast to bfloat16."""
    from diffkiln.kernels.backends import ConvGeometry, OneDnnStaticConv, OneDnnStaticLinear

    g = torch.Generator().manual_seed(3)
    if kind == "linear":
        w, x = torch.randn(48, 96, generator=g) * 0.05, torch.randn(21, 96, generator=g)
    else:
        w, x = torch.randn(24, 16, 3, 3, generator=g) * 0.05, torch.randn(2, 16, 9, 9, generator=g)
    wq, ws, act, _, _ = _quantized_operands(w, x, 8, 7)  # 7-bit grid: oneDNN is exact on every x86 CPU
    if not _onednn_usable(wq, act):
        pytest.skip("oneDNN's quantized ops are not available here")
    b = torch.randn(w.shape[0], generator=g)
    geo = ConvGeometry((1, 1), (1, 1), (1, 1))
    op = OneDnnStaticLinear(wq, ws, b, act) if kind == "linear" else OneDnnStaticConv(wq, ws, b, act, geo)
    xb = x.to(torch.bfloat16)
    out = op(xb)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, op(xb.float()).to(torch.bfloat16))
