"""MatMulNBits exports: the layout is exact, onnxruntime reads it as diffkiln does, and a mixed
bundle exported with ``matmulnbits=True`` runs in onnxruntime as the torch runtime does."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from diffkiln.core.metrics import sqnr_db
from diffkiln.core.packing import GROUP_MULT_MAX, pack_weights
from diffkiln.core.plan import WeightSpec
from diffkiln.export.onnx import OnnxExportConfig
from diffkiln.export.onnx.nbits import nbits_block_size, nbits_dequantize, to_matmulnbits
from diffkiln.kernels.backends import PackedWeights
from diffkiln.runtime import load
from tests.runtime_e2e_helpers import onnx_denoiser


def _packed(
    bits: int, n: int, k: int, group: int | None, seed: int = 0
) -> tuple[PackedWeights, torch.Tensor, torch.Tensor]:
    """Random packed weights, their float16 per-channel scales, and the float weight they hold
    (codes x group multiplier x scale)."""
    g = torch.Generator().manual_seed(seed)
    lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    q = torch.randint(lo, hi + 1, (n, k), generator=g, dtype=torch.int8)
    scale = (torch.rand(n, generator=g) * 0.1 + 0.01).half()
    mult = None
    eff = q.to(torch.float32)
    if group is not None:
        mult = torch.randint(1, GROUP_MULT_MAX + 1, (n, -(-k // group)), generator=g, dtype=torch.uint8)
        eff = eff * mult.to(torch.float32).repeat_interleave(group, dim=1)[:, :k]
    w = PackedWeights(pack_weights(q, bits), bits, k, mult, group)
    return w, scale, eff * scale.float()[:, None]


CASES = [(b, k, g) for b in (4, 2) for k, g in ((45, None), (64, None), (300, None), (64, 16), (100, 32), (256, 64))]


@pytest.mark.parametrize(("bits", "k", "group"), CASES, ids=[f"w{b}-k{k}-g{g or 0}" for b, k, g in CASES])
def test_matmulnbits_layout_holds_the_exact_weight(bits: int, k: int, group: int | None) -> None:
    w, scale, ref = _packed(bits, 12, k, group)
    converted = to_matmulnbits(w, scale)
    assert converted is not None
    b, scales, block = converted
    assert block == (group or block) and block in (16, 32, 64, 128, 256)
    assert b.dtype == torch.uint8 and b.shape == (12, -(-k // block), block * bits // 8)
    assert scales.dtype == torch.float32 and scales.shape == (12 * b.shape[1],)
    assert torch.equal(nbits_dequantize(b, scales, k, bits), ref)  # bit-exact


def test_block_size_stores_the_fewest_bytes_and_refuses_what_the_op_cannot_hold() -> None:
    assert nbits_block_size(320, 4, None) == 64  # 5 full blocks; 128 would pad 64 codes
    assert nbits_block_size(1280, 4, None) == 256
    assert nbits_block_size(45, 4, None) == 64  # 3 blocks of 16 store as many bits; ties take fewer scales
    assert nbits_block_size(100, 2, None) == 128  # 2-bit codes are cheap next to scales: one padded block
    assert nbits_block_size(256, 4, 32) == 32  # groups fix the block
    assert nbits_block_size(256, 4, 8) is None  # below MatMulNBits' smallest block
    assert nbits_block_size(256, 3, None) is None  # no 3-bit kernel: stays INT4 DequantizeLinear
    w, scale, _ = _packed(3, 4, 40, None)
    assert to_matmulnbits(w, scale) is None


def _single_node(b: torch.Tensor, scales: torch.Tensor, k: int, n: int, bits: int, block: int) -> bytes:
    from onnx import TensorProto, helper, numpy_helper

    node = helper.make_node("MatMulNBits", ["A", "B", "S"], ["Y"], domain="com.microsoft", K=k, N=n, bits=bits,
                            block_size=block, accuracy_level=0)  # fmt: skip
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("A", TensorProto.FLOAT, ["M", k])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["M", n])],
        [numpy_helper.from_array(b.numpy(), "B"), numpy_helper.from_array(scales.numpy(), "S")],
    )
    opsets = [helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)]
    model = helper.make_model(graph, opset_imports=opsets)
    onnx.checker.check_model(model, full_check=True)
    return model.SerializeToString()


@pytest.mark.parametrize(("bits", "k", "group"), CASES, ids=[f"w{b}-k{k}-g{g or 0}" for b, k, g in CASES])
def test_onnxruntime_reads_the_layout_as_diffkiln_does(bits: int, k: int, group: int | None) -> None:
    import onnxruntime as ort

    w, scale, ref = _packed(bits, 24, k, group, seed=1)
    converted = to_matmulnbits(w, scale)
    assert converted is not None
    b, scales, block = converted
    session = ort.InferenceSession(_single_node(b, scales, k, 24, bits, block), providers=["CPUExecutionProvider"])
    x = torch.randn(7, k, generator=torch.Generator().manual_seed(2))
    y = torch.from_numpy(session.run(None, {"A": x.numpy()})[0])
    assert sqnr_db(x @ ref.t(), y) >= 60.0  # float math on the same weights; only the sum order differs


SPECS = [
    WeightSpec(4, scale_dtype="float16"),
    WeightSpec(2, scale_dtype="float16"),
    WeightSpec(4, scale_dtype="float16", group_size=16),
    WeightSpec(3, scale_dtype="float16"),
    WeightSpec(8, scale_dtype="float16"),
]


@pytest.fixture(scope="module")
def nbits_exports(random_shapes_pipelines, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from tests.runtime_e2e_helpers import build_packed_bundle

    tmp = tmp_path_factory.mktemp("nbits")
    bundle, _ = build_packed_bundle(random_shapes_pipelines["unet"], tmp / "b", SPECS)
    out = {"bundle": bundle}
    # Static shapes: the layouts are what these tests check (dynamic axes are in tests/export/test_onnx.py),
    # and each dynamic export costs a second export and a check run.
    for key, nbits in (("standard", False), ("matmulnbits", True)):
        config = OnnxExportConfig(tmp / key, matmulnbits=nbits, dynamic=False, progress=False)
        out[key] = onnx_denoiser(bundle, config)
    return out


def test_four_and_two_bit_linears_become_matmulnbits(nbits_exports: dict[str, Path]) -> None:
    from diffkiln.nn import QLinear

    model = onnx.load(str(nbits_exports["matmulnbits"]))
    nodes = [n for n in model.graph.node if n.op_type == "MatMulNBits"]
    assert all(n.domain == "com.microsoft" for n in nodes)
    unet = load(nbits_exports["bundle"], "cpu").unet
    expected = [
        name
        for name, m in unet.named_modules()
        if isinstance(m, QLinear) and m.weight_bits in (2, 4) and (m.group_size or 16) >= 16
    ]
    assert expected and len(nodes) == len(expected)
    int4 = {i.name for i in model.graph.initializer if i.data_type in (onnx.TensorProto.INT4, onnx.TensorProto.INT2)}
    assert not any(f"{name}.w_t" in int4 for name in expected)  # their codes live in B only
    assert any(i.endswith(".w") for i in int4)  # 4-/2-bit convolutions keep INT4 DequantizeLinear
    grouped_standard = onnx.load(str(nbits_exports["standard"]))
    # Grouped 4-bit layers are int8 (code x multiplier) in standard ONNX, 4-bit blocks here.
    assert nbits_exports["matmulnbits"].stat().st_size < nbits_exports["standard"].stat().st_size
    assert grouped_standard.opset_import and all(n.domain != "com.microsoft" for n in grouped_standard.graph.node)


@pytest.mark.parametrize("optimize", [False, True], ids=["as-written", "optimized"])
def test_matmulnbits_export_matches_the_torch_runtime(nbits_exports: dict[str, Path], optimize: bool) -> None:
    from tests.export.test_onnx import _denoiser_calls, _ort_denoiser

    qpipe = load(nbits_exports["bundle"], "cpu")
    calls, _ = _denoiser_calls(qpipe, steps=2)
    ort_unet = _ort_denoiser(nbits_exports["matmulnbits"].parent, optimize)
    for args, kwargs in calls[:2]:
        with torch.no_grad():
            ref = qpipe.unet(*args, **kwargs)[0]
        out = ort_unet(*args, **kwargs)[0]
        assert np.isfinite(out.numpy()).all()
        assert sqnr_db(ref, out) >= 30.0
