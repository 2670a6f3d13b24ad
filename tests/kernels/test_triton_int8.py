"""The Triton int8 kernels of the CUDA backend (every shape; quantisation and dequantisation fused),
run in Triton's CPU interpreter (tests/conftest.py sets TRITON_INTERPRET=1 without a GPU).

The integer results must be bit-exact against the int64 reference, and every fused epilogue and
prologue bit-exact against the CPU backend's unfused ops on the same inputs. On a GPU (marked
``gpu``) the compiled kernels are checked the same way over the shapes cuBLASLt refused.
"""

from __future__ import annotations

import importlib
import os
import warnings
from types import ModuleType

import pytest
import torch

from diffkiln.kernels import ActGrid, get_backend
from diffkiln.kernels import backends as backends_mod
from diffkiln.kernels.backends import cuda as cuda_backend
from diffkiln.kernels.backends.base import static_quant_linear
from diffkiln.kernels.reference import dynamic_quant_per_token_reference, int_mm_reference, quant_matmul_reference

pytest.importorskip("triton")

# (M, K, N): M across the tile sizes and cuBLASLt's M <= 16 limit; odd K and N exercise the masks;
# (17, 64, 32) and (100, 32, 128) are shapes cuBLASLt refused on an H200.
SHAPES = [(1, 8, 8), (16, 33, 17), (17, 64, 32), (77, 100, 45), (100, 32, 128)]
GRIDS = [ActGrid(0.037, 0), ActGrid(0.05, 11), ActGrid(0.1, -3, 7)]
FLOATS = [torch.float32, torch.bfloat16, torch.float16]


@pytest.fixture(scope="module")
def kernels() -> ModuleType:
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("Triton runs compiled here (a GPU is present); see the gpu-marked tests")
    return importlib.import_module("diffkiln.kernels.triton_int8")


def _codes(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    return torch.randint(-128, 128, shape, generator=torch.Generator().manual_seed(seed), dtype=torch.int8)


@pytest.mark.parametrize(("m", "k", "n"), SHAPES, ids=str)
def test_int_mm_is_bit_exact_on_every_shape(kernels: ModuleType, m: int, k: int, n: int) -> None:
    a, b = _codes((m, k), m), _codes((k, n), k)
    assert torch.equal(kernels.quant_matmul_triton(a, b, None), int_mm_reference(a, b))
    # a row stride of its own (a view into a wider tensor) reads the same values
    wide = _codes((m, k + 5), 3)
    assert torch.equal(kernels.quant_matmul_triton(wide[:, :k], b, None), int_mm_reference(wide[:, :k].contiguous(), b))


@pytest.mark.parametrize(("m", "k", "n"), SHAPES, ids=str)
@pytest.mark.parametrize("dtype", FLOATS, ids=lambda d: str(d)[6:])
def test_quant_matmul_epilogue_is_bit_exact(kernels: ModuleType, m: int, k: int, n: int, dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(m + n)
    a, b = _codes((m, k), 1), _codes((k, n), 2)
    scale = torch.rand(n, generator=g) * 1e-3
    bias = torch.randint(-999, 999, (n,), generator=g, dtype=torch.int32)
    tok = torch.rand(m, generator=g) + 0.5
    got = kernels.quant_matmul_triton(a, b, scale, bias, tok, dtype)
    assert got.dtype == dtype
    assert torch.equal(got, quant_matmul_reference(a, b, scale, bias, tok, dtype))
    per_tensor = torch.tensor([2e-3])
    assert torch.equal(kernels.quant_matmul_triton(a, b, per_tensor), quant_matmul_reference(a, b, per_tensor))


@pytest.mark.parametrize(("m", "k", "n"), SHAPES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=lambda d: str(d)[6:])
def test_dynamic_quant_is_bit_exact(kernels: ModuleType, m: int, k: int, n: int, dtype: torch.dtype) -> None:
    x = (torch.randn(m, k, generator=torch.Generator().manual_seed(k)) * 3).to(dtype)
    x[0] = 0  # an all-zero row gets scale 1
    q, s = kernels.dynamic_quant_triton(x)
    ref_q, ref_s = dynamic_quant_per_token_reference(x)
    assert torch.equal(q, ref_q) and torch.equal(s, ref_s)


@pytest.mark.parametrize(("m", "k", "n"), SHAPES, ids=str)
@pytest.mark.parametrize("grid", GRIDS, ids=lambda g: f"s{g.scale}-z{g.zero_point}-b{g.bits}")
@pytest.mark.parametrize("dtype", FLOATS, ids=lambda d: str(d)[6:])
def test_fused_static_linear_equals_the_unfused_ops(
    kernels: ModuleType, m: int, k: int, n: int, grid: ActGrid, dtype: torch.dtype
) -> None:
    """Prologue quantisation (IEEE division, ties to even, clamp) and the epilogue (zero point, scales,
    bias, the output cast) against ActGrid.quantize, the exact GEMM and the float ops on the CPU."""
    g = torch.Generator().manual_seed(m * k)
    x = (torch.randn(m, k, generator=g) * 4).to(dtype)
    x[0, 0] = grid.scale * 2.5  # a tie: rounds to even
    w = _codes((k, n), 5)
    w_scale, bias = torch.rand(n, generator=g) * 1e-2, torch.randn(n, generator=g)
    ref = static_quant_linear(get_backend("cpu"), x, w, w_scale, bias, grid).to(dtype)
    fused = kernels.static_linear_triton(x, w, grid.scale * w_scale, w.to(torch.int32).sum(0), bias,
                                         (grid.scale, grid.zero_point, grid.qmin, grid.qmax), dtype)  # fmt: skip
    assert fused.dtype == dtype
    assert torch.equal(fused, ref)


def test_empty_inputs_and_bad_dtypes(kernels: ModuleType) -> None:
    assert kernels.quant_matmul_triton(_codes((0, 8), 1), _codes((8, 4), 2), None).shape == (0, 4)
    assert kernels.dynamic_quant_triton(torch.zeros(0, 8))[0].shape == (0, 8)
    with pytest.raises(ValueError, match="int8"):
        kernels.quant_matmul_triton(torch.zeros(2, 8), _codes((8, 4), 2), None)
    with pytest.raises(ValueError, match=r"\(K, N\)"):
        kernels.quant_matmul_triton(_codes((2, 8), 1), _codes((9, 4), 2), None)
    with pytest.raises(ValueError, match="float"):
        kernels.static_linear_triton(_codes((2, 8), 1), _codes((8, 4), 2), torch.ones(4),
                                     torch.zeros(4, dtype=torch.int32), None, (1.0, 0, -128, 127))  # fmt: skip


def test_cuda_backend_routes_every_int8_op_to_triton(kernels: ModuleType) -> None:
    """The backend's dispatch, on CPU tensors through the interpreted kernels (as on a GPU, where
    cuBLASLt would have refused (17, 64, 32))."""
    backend = backends_mod.CudaBackend()
    a, b = _codes((17, 64), 1), _codes((64, 32), 2)
    assert torch.equal(backend.int_mm(a, b), int_mm_reference(a, b))
    scale = torch.full((32,), 1e-3)
    assert torch.equal(backend.quant_matmul(a, b, scale, None, None, torch.float16),
                       quant_matmul_reference(a, b, scale, None, None, torch.float16))  # fmt: skip
    x = torch.randn(17, 64).to(torch.bfloat16)
    (q, s), (ref_q, ref_s) = backend.dynamic_quant(x), dynamic_quant_per_token_reference(x)
    assert torch.equal(q, ref_q) and torch.equal(s, ref_s)
    grid, w_q, w_scale = ActGrid(0.02, 4), _codes((32, 64), 3), torch.rand(32) * 1e-2
    layer = backend.prepack_static_linear(w_q, w_scale, None, grid)
    assert type(layer).__name__ == "TritonStaticLinear" and torch.equal(layer.codes_t(), w_q.t())
    other = ActGrid(0.03, -2)  # a timestep-aware layer's grid of another step range
    for act in (None, other):
        out = layer(x, act)
        assert out.dtype == torch.bfloat16  # written in the activations' dtype by the epilogue
        ref = static_quant_linear(get_backend("cpu"), x, w_q.t(), w_scale, None, act or grid).to(torch.bfloat16)
        assert torch.equal(out, ref)


def test_without_triton_int8_gemms_fall_back_to_padded_cublaslt(monkeypatch: pytest.MonkeyPatch) -> None:
    cuda_backend._triton_kernel.cache_clear()
    real_import = importlib.import_module

    def no_triton(name: str, *args: object) -> ModuleType:
        if name.startswith("diffkiln.kernels.triton_"):
            raise ImportError("No module named 'triton'")
        return real_import(name, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(cuda_backend.importlib, "import_module", no_triton)
    a, b = _codes((5, 30), 1), _codes((30, 13), 2)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            # torch._int_mm runs on the CPU too: the padding (M to 24, K to 32, N to 16) is exact
            out = backends_mod.CudaBackend().int_mm(a, b)
    finally:
        cuda_backend._triton_kernel.cache_clear()
    assert torch.equal(out, int_mm_reference(a, b))
    assert any(issubclass(c.category, backends_mod.SlowKernelWarning) and "pip install triton" in str(c.message)
               for c in caught)  # fmt: skip


GPU_M = [*range(1, 18), 77, 100, 1500, 4097]
GPU_KN = [(8, 8), (33, 17), (64, 32), (32, 128), (320, 1280), (4096, 4096), (1000, 77)]


@pytest.mark.gpu
@pytest.mark.parametrize("m", GPU_M)
@pytest.mark.parametrize(("k", "n"), GPU_KN, ids=str)
def test_compiled_int8_gemm_is_bit_exact_on_every_shape(m: int, k: int, n: int) -> None:
    from diffkiln.kernels.triton_int8 import quant_matmul_triton

    a, b = _codes((m, k), m).cuda(), _codes((k, n), k).cuda()
    # float64 is exact here: |sums| <= 4096 x 2**14 < 2**53
    ref = (a.double() @ b.double()).to(torch.int32)
    assert torch.equal(get_backend("cuda").int_mm(a, b), ref)
    assert torch.equal(quant_matmul_triton(a, b, None), ref)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", FLOATS, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("grid", GRIDS, ids=lambda g: f"s{g.scale}-z{g.zero_point}-b{g.bits}")
def test_compiled_static_linear_matches_the_cpu(dtype: torch.dtype, grid: ActGrid) -> None:
    from diffkiln.kernels.triton_int8 import static_linear_triton

    g = torch.Generator().manual_seed(1)
    x = (torch.randn(1500, 320, generator=g) * 4).to(dtype)
    w, w_scale, bias = _codes((320, 640), 2), torch.rand(640, generator=g) * 1e-2, torch.randn(640, generator=g)
    ref = static_quant_linear(get_backend("cpu"), x, w, w_scale, bias, grid).to(dtype)
    scale = (grid.scale * w_scale).cuda()
    out = static_linear_triton(x.cuda(), w.cuda(), scale, w.to(torch.int32).sum(0).cuda(), bias.cuda(),
                               (grid.scale, grid.zero_point, grid.qmin, grid.qmax), dtype)  # fmt: skip
    assert torch.equal(out.cpu(), ref)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=lambda d: str(d)[6:])
def test_a_timestep_aware_layer_reads_its_step_from_device_memory(kernels: ModuleType, dtype: torch.dtype) -> None:
    """Each step of the stepped kernel (the index a 0-d tensor, as the step selector keeps it on the
    device) equals the plain fused call on that step's grid, and so the CPU backend's."""
    g = torch.Generator().manual_seed(3)
    x, w = (torch.randn(40, 70, generator=g) * 3).to(dtype), _codes((70, 33), 4)
    w_scale, bias = torch.rand(33, generator=g) * 1e-2, torch.randn(33, generator=g)
    grids = [ActGrid(0.05, 0), ActGrid(0.02, 13), ActGrid(0.08, -7)]
    table, scales = kernels.step_tables(grids, w_scale)
    colsum = w.to(torch.int32).sum(0)
    for i, grid in enumerate(grids):
        stepped = kernels.static_linear_stepped_triton(x, w, scales, colsum, bias, table, torch.tensor(i), dtype)
        ref = static_quant_linear(get_backend("cpu"), x, w, w_scale, bias, grid).to(dtype)
        assert torch.equal(stepped, ref), i
    layer = backends_mod.CudaBackend().prepack_static_linear(w.t().contiguous(), w_scale, bias, grids[0])
    assert torch.equal(layer.call_step(x, grids, torch.tensor(2)), layer(x, grids[2]))
