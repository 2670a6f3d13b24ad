"""The Triton implicit-GEMM static convolution, in Triton's CPU interpreter: bit-exact against
im2col (F.unfold) and the CPU backend's exact static GEMM, on the geometries diffusion UNets use."""

from __future__ import annotations

import importlib
import os
from types import ModuleType

import pytest
import torch
import torch.nn.functional as F

from diffkiln.kernels import ActGrid, ConvGeometry, get_backend
from diffkiln.kernels import backends as backends_mod
from diffkiln.kernels.backends.base import static_quant_linear

pytest.importorskip("triton")

# (batch, in, out, h, w, kernel, stride, padding, dilation): 3x3 same, a strided downsample, a 1x1
# projection, an odd size with asymmetric kernel and dilation
CASES = [
    (2, 5, 7, 9, 9, (3, 3), (1, 1), (1, 1), (1, 1)),
    (1, 8, 16, 10, 10, (3, 3), (2, 2), (1, 1), (1, 1)),
    (2, 16, 8, 6, 6, (1, 1), (1, 1), (0, 0), (1, 1)),
    (1, 3, 5, 7, 11, (3, 1), (1, 2), (2, 0), (2, 1)),
]


@pytest.fixture(scope="module")
def conv() -> ModuleType:
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("Triton runs compiled here (a GPU is present)")
    return importlib.import_module("diffkiln.kernels.triton_conv")


def _im2col_reference(x, w_q, w_scale, bias, grid, geo):  # type: ignore[no-untyped-def]
    b, _, h, w = x.shape
    kh, kw = w_q.shape[2:]
    cols = F.unfold(x, (kh, kw), dilation=geo.dilation, padding=geo.padding, stride=geo.stride)
    oh = (h + 2 * geo.padding[0] - geo.dilation[0] * (kh - 1) - 1) // geo.stride[0] + 1
    ow = (w + 2 * geo.padding[1] - geo.dilation[1] * (kw - 1) - 1) // geo.stride[1] + 1
    w_t = w_q.reshape(w_q.shape[0], -1).t().contiguous()
    out = static_quant_linear(get_backend("cpu"), cols.transpose(1, 2).reshape(-1, cols.shape[1]), w_t, w_scale,
                              bias, grid)  # fmt: skip
    return out.reshape(b, oh * ow, -1).transpose(1, 2).reshape(b, -1, oh, ow)


@pytest.mark.parametrize("case", CASES, ids=str)
@pytest.mark.parametrize("grid", [ActGrid(0.05, 0), ActGrid(0.04, 9), ActGrid(0.1, -5, 7)], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=lambda d: str(d)[6:])
def test_implicit_gemm_convolution_equals_im2col(conv: ModuleType, case: tuple, grid: ActGrid,
                                                 dtype: torch.dtype) -> None:  # fmt: skip
    b, cin, cout, h, w, kernel, stride, padding, dilation = case
    g = torch.Generator().manual_seed(cin * cout)
    x = (torch.randn(b, cin, h, w, generator=g) * 3).to(dtype)
    w_q = torch.randint(-128, 128, (cout, cin, *kernel), generator=g, dtype=torch.int8)
    w_scale, bias = torch.rand(cout, generator=g) * 1e-2, torch.randn(cout, generator=g)
    geo = ConvGeometry(stride, padding, dilation)
    layer = conv.TritonStaticConv(w_q, w_scale, bias, grid, geo)
    out = layer(x)
    assert out.dtype == dtype
    assert torch.equal(out, _im2col_reference(x, w_q, w_scale, bias, grid, geo).to(dtype))
    assert torch.equal(layer.codes_t(), w_q.reshape(cout, -1).t())
    # a channels-last input (other strides) and another grid (a timestep-aware step range) for the same layer
    other = ActGrid(grid.scale * 1.5, grid.zero_point - 1, grid.bits)
    cl = x.contiguous(memory_format=torch.channels_last)
    assert torch.equal(layer(cl, other), _im2col_reference(x, w_q, w_scale, bias, other, geo).to(dtype))


def test_cuda_backend_prepares_the_implicit_gemm_and_refuses_groups(conv: ModuleType) -> None:
    backend = backends_mod.CudaBackend()
    w_q = torch.randint(-128, 128, (4, 4, 3, 3), dtype=torch.int8)
    grid = ActGrid(0.05, 3)
    prepared = backend.prepack_static_conv(w_q, torch.ones(4), None, grid, ConvGeometry((1, 1), (1, 1), (1, 1)))
    assert type(prepared).__name__ == "TritonStaticConv"
    grouped = ConvGeometry((1, 1), (1, 1), (1, 1), groups=2)
    assert backend.prepack_static_conv(w_q, torch.ones(4), None, grid, grouped) is None
    with pytest.raises(ValueError, match="groups=1"):
        conv.static_conv_triton(torch.zeros(1, 4, 5, 5), w_q.reshape(4, -1).t(), torch.ones(4),
                                torch.zeros(4, dtype=torch.int32), None, grid, (3, 3), grouped)  # fmt: skip


def test_a_timestep_aware_convolution_reads_its_step_from_device_memory(conv: ModuleType) -> None:
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 6, 8, 8, generator=g) * 2
    w_q = torch.randint(-128, 128, (10, 6, 3, 3), generator=g, dtype=torch.int8)
    w_scale, bias = torch.rand(10, generator=g) * 1e-2, torch.randn(10, generator=g)
    geo = ConvGeometry((1, 1), (1, 1), (1, 1))
    grids = [ActGrid(0.05, 0), ActGrid(0.03, 9), ActGrid(0.07, -4)]
    layer = conv.TritonStaticConv(w_q, w_scale, bias, grids[0], geo)
    for i, grid in enumerate(grids):
        expected = _im2col_reference(x, w_q, w_scale, bias, grid, geo)
        assert torch.equal(layer.call_step(x, grids, torch.tensor(i)), expected)
