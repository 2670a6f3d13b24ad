"""The Triton packed W{4,3,2}A8 kernel, run in Triton's CPU interpreter (no GPU needed).

Integer results must be bit-exact against unpacking to int8 and the exact int8 GEMM; the whole
layer must match the float op on dequantized tensors. On a GPU (marked ``gpu``) the compiled
kernel is checked the same way.
"""

from __future__ import annotations

import importlib
import os
import warnings
from types import ModuleType

import pytest
import torch

from diffkiln.core.metrics import sqnr_db
from diffkiln.core.packing import GROUP_MULT_MAX, pack_weights
from diffkiln.kernels import ActGrid, PackedWeights, get_backend
from diffkiln.kernels import backends as backends_mod
from diffkiln.kernels.backends import cuda as cuda_backend

pytest.importorskip("triton")

BITS = [4, 3, 2]
SHAPES = [(5, 77, 45), (40, 128, 70), (70, 200, 64)]  # (M, K, N): odd K and N exercise the masks


@pytest.fixture(scope="module")
def interpreted() -> ModuleType:
    """The kernel module under Triton's CPU interpreter (tests/conftest.py sets TRITON_INTERPRET=1
    when there is no GPU); on a GPU these CPU-tensor tests skip and the ``gpu`` test runs compiled."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("Triton runs compiled here (a GPU is present); see test_compiled_triton_kernel_on_gpu")
    return importlib.import_module("diffkiln.kernels.triton_lowbit")


def _weights(n: int, k: int, bits: int, group_size: int | None, seed: int) -> tuple[PackedWeights, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1)
    q = torch.randint(lo, hi, (n, k), generator=g, dtype=torch.int8)
    mult = None
    if group_size is not None:
        groups = -(-k // group_size)
        mult = torch.randint(1, GROUP_MULT_MAX + 1, (n, groups), generator=g, dtype=torch.uint8)
    w = PackedWeights(pack_weights(q, bits), bits, k, mult, group_size)
    return w, w.codes()


@pytest.mark.parametrize("bits", BITS, ids=lambda b: f"w{b}")
@pytest.mark.parametrize(("m", "k", "n"), SHAPES, ids=lambda v: str(v))
@pytest.mark.parametrize("group_size", [None, 32], ids=["per-channel", "groups32"])
@pytest.mark.parametrize("epilogue", ["plain", "zero-point+bias", "per-token"])
def test_triton_packed_kernel_is_bit_exact(
    interpreted: ModuleType, bits: int, m: int, k: int, n: int, group_size: int | None, epilogue: str
) -> None:
    w, codes = _weights(n, k, bits, group_size, seed=m + k + bits)
    g = torch.Generator().manual_seed(7)
    x = torch.randint(-128, 128, (m, k), generator=g, dtype=torch.int8)
    scale = torch.rand(n, generator=g) * 1e-3 + 1e-4
    bias = torch.randint(-5000, 5000, (n,), generator=g, dtype=torch.int32) if epilogue != "plain" else None
    tok = torch.rand(m, generator=g) + 0.5 if epilogue == "per-token" else None
    zp = 3 if epilogue == "zero-point+bias" else 0
    out = interpreted.packed_quant_matmul_triton(x, w, scale, bias, tok, torch.float32, zp)
    # The reference: unpack to int8, the exact int8 GEMM, the same float32 epilogue.
    ref = get_backend("cpu").packed_quant_matmul(x, w, scale, bias, tok, torch.float32, zp)
    assert torch.equal(out, ref)
    if epilogue == "plain":  # and the integers themselves, against an int64 GEMM of the codes
        acc = (x.to(torch.int64) @ codes.to(torch.int64).t()).to(torch.float32) * scale
        assert torch.equal(out, acc)


@pytest.mark.parametrize("bits", BITS, ids=lambda b: f"w{b}")
def test_triton_layer_matches_float_op_on_dequantized_tensors(interpreted: ModuleType, bits: int) -> None:
    m, k, n = 33, 96, 48
    g = torch.Generator().manual_seed(bits)
    x = torch.randn(m, k, generator=g)
    w, codes = _weights(n, k, bits, None, seed=bits)
    w_scale = torch.rand(n, generator=g) * 0.02 + 0.01
    grid = ActGrid(float(x.abs().max()) / 127, 0, 8)
    q = grid.quantize(x)
    out = interpreted.packed_quant_matmul_triton(q, w, grid.scale * w_scale)
    dequant = (q.float() * grid.scale) @ (codes.float() * w_scale[:, None]).t()
    assert sqnr_db(dequant, out) >= 40.0


@pytest.mark.parametrize("bits", BITS, ids=lambda b: f"w{b}")
@pytest.mark.parametrize("group_size", [None, 32], ids=["per-channel", "groups32"])
# No bfloat16 here: numpy has none, and Triton's interpreter computes a bfloat16 dot on the raw
# bits (measured: garbage). test_compiled_weight_only_kernel_on_gpu checks bfloat16 compiled.
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=lambda d: str(d)[6:])
def test_triton_weight_only_kernel_matches_the_float_op(
    interpreted: ModuleType, bits: int, group_size: int | None, dtype: torch.dtype
) -> None:
    m, k, n = 37, 150, 70
    w, codes = _weights(n, k, bits, group_size, seed=bits + 11)
    g = torch.Generator().manual_seed(bits)
    x = torch.randn(m, k, generator=g).to(dtype)
    scale = torch.rand(n, generator=g) * 0.02 + 0.01
    bias = torch.randn(n, generator=g)
    out = interpreted.packed_weight_only_matmul_triton(x, w, scale, bias)
    assert out.dtype == torch.float32
    # The float op on dequantized weights, and the backends' own path (unpack + weight_only_matmul).
    dequant = x.float() @ (codes.float() * scale[:, None]).t() + bias
    assert sqnr_db(dequant, out) >= 60.0
    ref = get_backend("cpu").packed_weight_only_matmul(x, w, scale, bias)
    assert sqnr_db(ref, out) >= 60.0


def test_cuda_backend_routes_packed_layers_to_triton(interpreted: ModuleType, monkeypatch: pytest.MonkeyPatch) -> None:
    # The CUDA backend's dispatch, exercised on CPU tensors through the interpreted kernel.
    calls: list[int] = []
    real = interpreted.packed_quant_matmul_triton

    def spy(*args: object) -> torch.Tensor:
        calls.append(1)
        return real(*args)

    def spy_wo(*args: object) -> torch.Tensor:
        calls.append(1)
        return interpreted.packed_weight_only_matmul_triton(*args)

    monkeypatch.setattr(cuda_backend, "_triton_kernel", lambda module, name: spy if "quant" in name else spy_wo)
    w, _ = _weights(24, 50, 4, None, seed=1)
    x = torch.randint(-128, 128, (20, 50), dtype=torch.int8)
    scale = torch.full((24,), 1e-3)
    out = backends_mod.CudaBackend().packed_quant_matmul(x, w, scale, None, None, torch.float32, 0)
    backends_mod.CudaBackend().packed_weight_only_matmul(x.float(), w, scale, None)
    assert calls == [1, 1]
    assert torch.equal(out, get_backend("cpu").packed_quant_matmul(x, w, scale, None, None, torch.float32, 0))


def test_cuda_backend_without_triton_warns_and_unpacks(monkeypatch: pytest.MonkeyPatch) -> None:
    cuda_backend._triton_kernel.cache_clear()
    real_import = importlib.import_module

    def no_triton(name: str, *args: object) -> ModuleType:
        if name == "diffkiln.kernels.triton_lowbit":
            raise ImportError("No module named 'triton'")
        return real_import(name, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(cuda_backend.importlib, "import_module", no_triton)
    w, _ = _weights(8, 40, 2, 16, seed=3)
    x = torch.randint(-128, 128, (18, 40), dtype=torch.int8)
    scale = torch.full((8,), 1e-2)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            out = backends_mod.CudaBackend().packed_quant_matmul(x, w, scale, None, None, torch.float32, 2)
    finally:
        cuda_backend._triton_kernel.cache_clear()
    assert any(issubclass(c.category, backends_mod.SlowKernelWarning) and "pip install triton" in str(c.message)
               for c in caught)  # fmt: skip
    assert torch.equal(out, get_backend("cpu").packed_quant_matmul(x, w, scale, None, None, torch.float32, 2))


@pytest.mark.gpu
@pytest.mark.parametrize("bits", BITS, ids=lambda b: f"w{b}")
def test_compiled_triton_kernel_on_gpu(bits: int) -> None:
    from diffkiln.kernels.triton_lowbit import packed_quant_matmul_triton

    w, _ = _weights(640, 320, bits, 64, seed=bits)
    assert w.group_mult is not None
    g = torch.Generator().manual_seed(bits)
    x = torch.randint(-128, 128, (77, 320), generator=g, dtype=torch.int8)
    scale = torch.full((640,), 1e-3)
    on_gpu = PackedWeights(w.packed.cuda(), bits, 320, w.group_mult.cuda(), 64)
    out = packed_quant_matmul_triton(x.cuda(), on_gpu, scale.cuda(), None, None, torch.float32, 5)
    ref = get_backend("cpu").packed_quant_matmul(x, w, scale, None, None, torch.float32, 5)
    assert torch.equal(out.cpu(), ref)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=lambda d: str(d)[6:])
def test_compiled_weight_only_kernel_on_gpu(dtype: torch.dtype) -> None:
    from diffkiln.kernels.triton_lowbit import packed_weight_only_matmul_triton

    w, codes = _weights(640, 320, 4, 64, seed=5)
    assert w.group_mult is not None
    x = torch.randn(77, 320).to(dtype)
    scale = torch.full((640,), 1e-2)
    on_gpu = PackedWeights(w.packed.cuda(), 4, 320, w.group_mult.cuda(), 64)
    out = packed_weight_only_matmul_triton(x.cuda(), on_gpu, scale.cuda())
    dequant = x.float() @ (codes.float() * scale[:, None]).t()
    assert sqnr_db(dequant, out.cpu()) >= 40.0
