"""The block-sparse attention kernel against the dense masked reference, on uneven lengths, every
kind of row (full, one block, padded), and the layout's own bookkeeping."""

from __future__ import annotations

import shutil

import pytest
import torch
import torch.nn.functional as F

from diffkiln.kernels.sparse_attention import (
    _FLEX_FAILED,
    BlockLayout,
    SparseKernel,
    block_sparse_attention,
    sparse_attention_reference,
)


def _random_mask(heads: int, qb: int, kb: int, density: float, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(heads, qb, kb, generator=g) < density
    mask[..., 0] = True  # a sink block: every row keeps at least one
    return mask


def _band_mask(heads: int, qb: int, kb: int, width: int) -> torch.Tensor:
    i, j = torch.arange(qb)[:, None], torch.arange(kb)[None]
    return ((i - j).abs() <= width).expand(heads, qb, kb).clone()


CASES = [
    # (batch, heads, q_len, kv_len, head_dim, block)
    (1, 2, 256, 256, 16, 64),
    (2, 3, 1000, 1000, 32, 64),  # a short last block
    (1, 2, 300, 77, 16, 32),  # queries against a shorter key sequence (cross-attention-like)
    (1, 1, 50, 50, 8, 128),  # one block shorter than the block size
]


@pytest.mark.parametrize("density", [1.0, 0.5, 0.2])
@pytest.mark.parametrize(("batch", "heads", "q_len", "kv_len", "dim", "block"), CASES)
def test_kernel_matches_the_dense_masked_reference(
    batch: int, heads: int, q_len: int, kv_len: int, dim: int, block: int, density: float
) -> None:
    qb, kb = -(-q_len // block), -(-kv_len // block)
    layout = BlockLayout.from_mask(_random_mask(heads, qb, kb, density, seed=q_len), q_len, kv_len, block)
    g = torch.Generator().manual_seed(1)
    q = torch.randn(batch, heads, q_len, dim, generator=g)
    k = torch.randn(batch, heads, kv_len, dim, generator=g)
    v = torch.randn(batch, heads, kv_len, dim + 8, generator=g)  # value width may differ
    ref = sparse_attention_reference(q, k, v, layout)
    got = block_sparse_attention(q, k, v, layout)
    assert got.shape == ref.shape
    assert F.cosine_similarity(got.flatten(), ref.flatten(), dim=0) >= 0.9999
    assert (got - ref).abs().max() < 1e-4
    # Deterministic: the same inputs give the same bits.
    assert torch.equal(block_sparse_attention(q, k, v, layout), got)


@pytest.mark.parametrize("op", ["_sdpa", "_matmul_softmax"])
@pytest.mark.parametrize(("batch", "heads", "q_len", "kv_len", "dim", "block"), CASES)
def test_both_ops_on_the_gathered_runs_match_the_reference(
    batch: int, heads: int, q_len: int, kv_len: int, dim: int, block: int, op: str
) -> None:
    # CPU float32 runs the matmul-softmax op, other dtypes and devices SDPA: each against the reference.
    import diffkiln.kernels.sparse_attention as sa

    qb, kb = -(-q_len // block), -(-kv_len // block)
    layout = BlockLayout.from_mask(_random_mask(heads, qb, kb, 0.4, seed=kv_len), q_len, kv_len, block)
    g = torch.Generator().manual_seed(3)
    q = torch.randn(batch, heads, q_len, dim, generator=g)
    k = torch.randn(batch, heads, kv_len, dim, generator=g)
    v = torch.randn(batch, heads, kv_len, dim + 8, generator=g)
    ref = sparse_attention_reference(q, k, v, layout, scale=0.3)
    got = sa._gathered(q, k, v, layout, 0.3, getattr(sa, op))
    assert F.cosine_similarity(got.flatten(), ref.flatten(), dim=0) >= 0.9999
    assert (got - ref).abs().max() < 1e-4


def test_bfloat16_on_cpu_runs_sdpa_on_the_runs_and_stays_close() -> None:
    import diffkiln.kernels.sparse_attention as sa

    assert sa._run_attend(torch.zeros(1, dtype=torch.bfloat16)) is sa._sdpa
    assert sa._run_attend(torch.zeros(1)) is sa._matmul_softmax
    layout = BlockLayout.from_mask(_random_mask(2, 8, 8, 0.4, seed=5), 500, 500, 64)
    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(1, 2, 500, 32, generator=g) for _ in range(3))
    ref = sparse_attention_reference(q, k, v, layout)
    got = block_sparse_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), layout, kernel=SparseKernel.GATHER)
    assert got.dtype == torch.bfloat16
    assert F.cosine_similarity(got.float().flatten(), ref.flatten(), dim=0) >= 0.999


def test_chunks_of_rows_give_the_one_chunk_result(monkeypatch: pytest.MonkeyPatch) -> None:
    # A small chunk budget: many chunks of uneven widths through the reused gather buffers.
    import diffkiln.kernels.sparse_attention as sa

    q_len, block = 640, 32
    layout = BlockLayout.from_mask(_random_mask(3, 20, 20, 0.4, seed=7), q_len, q_len, block)
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(2, 3, q_len, 16, generator=g) for _ in range(3))
    whole = block_sparse_attention(q, k, v, layout, kernel=SparseKernel.GATHER)
    for budget in ("_CHUNK_BYTES", "_MATMUL_CHUNK_BYTES"):  # a few rows per chunk, not all 60
        monkeypatch.setattr(sa, budget, 2 * block * 32 * 4 * 32)
    chunked = block_sparse_attention(q, k, v, layout, kernel=SparseKernel.GATHER)
    assert torch.allclose(chunked, whole, atol=1e-6)
    ref = sparse_attention_reference(q, k, v, layout)
    assert F.cosine_similarity(chunked.flatten(), ref.flatten(), dim=0) >= 0.9999


def test_a_full_layout_is_dense_attention_and_a_band_keeps_its_width() -> None:
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(1, 2, 512, 16, generator=g) for _ in range(3))
    full = BlockLayout.from_mask(torch.ones(2, 8, 8, dtype=torch.bool), 512, 512, 64)
    assert full.density == 1.0
    assert full.keeps_every_block and not BlockLayout.from_mask(_band_mask(2, 8, 8, 1), 512, 512, 64).keeps_every_block
    dense = F.scaled_dot_product_attention(q, k, v)
    # A dense layout runs one plain attention call (no gathers): the same bits as SDPA itself.
    assert torch.equal(block_sparse_attention(q, k, v, full), dense)
    assert torch.equal(block_sparse_attention(q, k, v, full, kernel=SparseKernel.GATHER), dense)
    band = BlockLayout.from_mask(_band_mask(2, 8, 8, 1), 512, 512, 64)
    assert band.density == pytest.approx((8 * 3 - 2) / 64)
    assert F.cosine_similarity(block_sparse_attention(q, k, v, band).flatten(),
                               sparse_attention_reference(q, k, v, band).flatten(), dim=0) >= 0.9999  # fmt: skip


@pytest.mark.parametrize(("q_len", "kv_len", "block"), [(256, 256, 64), (1000, 77, 64), (5, 130, 64)])
def test_layout_round_trips_and_measures_density_in_tokens(q_len: int, kv_len: int, block: int) -> None:
    qb, kb = -(-q_len // block), -(-kv_len // block)
    mask = _random_mask(3, qb, kb, 0.4, seed=3)
    layout = BlockLayout.from_mask(mask, q_len, kv_len, block)
    assert torch.equal(layout.to_mask(), mask)
    assert layout.indices.dtype == torch.int32 and layout.indices.shape[-1] == int(mask.sum(-1).max())
    assert layout.density == pytest.approx(float(layout.token_mask().double().mean()), abs=1e-9)


def test_a_layout_that_does_not_fit_is_refused_with_the_reason() -> None:
    layout = BlockLayout.from_mask(torch.ones(2, 4, 4, dtype=torch.bool), 256, 256, 64)
    q = torch.randn(1, 2, 320, 16)  # another resolution than the mask was made for
    with pytest.raises(ValueError, match="another resolution or frame count"):
        block_sparse_attention(q, q, q, layout)
    with pytest.raises(ValueError, match="at least one key block"):
        BlockLayout(torch.full((1, 4, 2), -1, dtype=torch.int32), 256, 256, 64)
    with pytest.raises(ValueError, match=r"lie in \[0, 4\)"):
        BlockLayout(torch.full((1, 4, 1), 4, dtype=torch.int32), 256, 256, 64)
    with pytest.raises(ValueError, match="query blocks"):
        BlockLayout(torch.zeros((1, 3, 1), dtype=torch.int32), 256, 256, 64)


def test_non_contiguous_inputs_as_diffusers_passes_them() -> None:
    # diffusers permutes (batch, tokens, heads, dim) to (batch, heads, tokens, dim): a strided view.
    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(1, 256, 2, 16, generator=g).permute(0, 2, 1, 3) for _ in range(3))
    layout = BlockLayout.from_mask(_band_mask(2, 4, 4, 1), 256, 256, 64)
    got = block_sparse_attention(q, k, v, layout)
    ref = sparse_attention_reference(q.contiguous(), k.contiguous(), v.contiguous(), layout)
    assert F.cosine_similarity(got.flatten(), ref.flatten(), dim=0) >= 0.9999


@pytest.mark.parametrize(("q_len", "block", "density"), [(256, 64, 0.5), (300, 64, 0.3), (512, 128, 0.5)])
def test_the_flexattention_path_matches_the_reference(q_len: int, block: int, density: float) -> None:
    # The CUDA path (compiled there); eager on CPU checks the BlockMask it builds from the layout.
    from diffkiln.kernels.sparse_flex import flex_block_sparse_attention

    blocks = -(-q_len // block)
    layout = BlockLayout.from_mask(_random_mask(2, blocks, blocks, density, seed=7), q_len, q_len, block)
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(1, 2, q_len, 16, generator=g) for _ in range(3))
    got = flex_block_sparse_attention(q, k, v, layout, compiled=False)
    ref = sparse_attention_reference(q, k, v, layout)
    assert F.cosine_similarity(got.flatten(), ref.flatten(), dim=0) >= 0.9999


@pytest.mark.slow  # compiling from cold takes one to two minutes on two cores
@pytest.mark.skipif(shutil.which("c++") is None, reason="compiling FlexAttention on CPU needs a C++ compiler")
def test_compiled_flexattention_on_cpu_matches_the_reference() -> None:
    # What `auto` runs on long CPU layers; one shape, since each new shape compiles afresh.
    q_len = 300  # a short last block too
    layout = BlockLayout.from_mask(_random_mask(2, 5, 5, 0.4, seed=9), q_len, q_len, 64)
    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(1, 2, q_len, 16, generator=g) for _ in range(3))
    got = block_sparse_attention(q, k, v, layout, kernel=SparseKernel.FLEX)
    assert not _FLEX_FAILED  # it compiled, rather than falling back to the gather kernel
    ref = sparse_attention_reference(q, k, v, layout)
    assert F.cosine_similarity(got.flatten(), ref.flatten(), dim=0) >= 0.9999


def test_a_failing_compile_falls_back_to_the_gather_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    import diffkiln.kernels.sparse_flex as flex

    def broken(*_a: object, **_k: object) -> None:
        raise RuntimeError("no compiler")

    monkeypatch.setattr(flex, "flex_block_sparse_attention", broken)
    monkeypatch.setattr("diffkiln.kernels.sparse_attention._FLEX_FAILED", set())
    layout = BlockLayout.from_mask(_random_mask(2, 4, 4, 0.5, seed=3), 256, 256, 64)
    q, k, v = (torch.randn(1, 2, 256, 16, generator=torch.Generator().manual_seed(i)) for i in range(3))
    got = block_sparse_attention(q, k, v, layout, kernel=SparseKernel.FLEX)
    assert torch.equal(got, block_sparse_attention(q, k, v, layout, kernel=SparseKernel.GATHER))


@pytest.mark.gpu
def test_the_cuda_kernel_matches_the_reference() -> None:
    layout = BlockLayout.from_mask(_random_mask(4, 16, 16, 0.3, seed=8), 2048, 2048, 128)
    g = torch.Generator().manual_seed(6)
    q, k, v = (torch.randn(1, 4, 2048, 64, generator=g).cuda() for _ in range(3))
    got = block_sparse_attention(q, k, v, layout).cpu()
    ref = sparse_attention_reference(q.cpu(), k.cpu(), v.cpu(), layout)
    assert F.cosine_similarity(got.flatten(), ref.flatten(), dim=0) >= 0.9999


@pytest.mark.parametrize(("q_len", "block", "density"), [(256, 64, 0.5), (1000, 64, 0.3), (1000, 64, 1.0)])
def test_the_npu_path_matches_the_reference(q_len: int, block: int, density: float,
                                            monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    import sys

    from diffkiln.kernels.sparse_attention import npu_block_sparse_attention
    from tests.kernels.npu_emulation import make_fake_torch_npu

    monkeypatch.setitem(sys.modules, "torch_npu", make_fake_torch_npu())
    blocks = -(-q_len // block)
    layout = BlockLayout.from_mask(_random_mask(2, blocks, blocks, density, seed=9), q_len, q_len, block)
    g = torch.Generator().manual_seed(10)
    q, k, v = (torch.randn(2, 2, q_len, 16, generator=g) for _ in range(3))
    got = npu_block_sparse_attention(q, k, v, layout)
    ref = sparse_attention_reference(q, k, v, layout)
    assert F.cosine_similarity(got.flatten(), ref.flatten(), dim=0) >= 0.9999


@pytest.mark.parametrize("faster", ["flex", "gather"])
def test_auto_on_cpu_times_both_kernels_once_per_shape_and_keeps_the_faster(
    faster: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import time

    import diffkiln.kernels.sparse_attention as sa

    calls = {"flex": 0, "gather": 0}
    real_gathered = sa._gathered

    def kernel(name: str, real: object) -> object:
        def run(*args: object) -> torch.Tensor:
            calls[name] += 1
            if name != faster:
                time.sleep(0.05)
            return real(*args)  # type: ignore[operator]

        return run

    monkeypatch.setattr(sa, "_CPU_CHOICE", {})
    monkeypatch.setattr(sa, "FLEX_MIN_TOKENS", 64)
    monkeypatch.setattr(sa, "_has_compiler", lambda: True)
    monkeypatch.setattr(sa, "_gathered", kernel("gather", real_gathered))
    monkeypatch.setattr(sa, "_flex", kernel("flex", lambda q, k, v, lay, sc: real_gathered(q, k, v, lay, sc, sa._sdpa)))
    layout = BlockLayout.from_mask(_random_mask(2, 4, 4, 0.5, seed=3), 256, 256, 64)
    g = torch.Generator().manual_seed(6)
    q, k, v = (torch.randn(1, 2, 256, 16, generator=g) for _ in range(3))
    ref = sparse_attention_reference(q, k, v, layout)
    first = block_sparse_attention(q, k, v, layout)  # times both: gather once, flex compiled then timed
    assert calls == {"flex": 2, "gather": 1}
    assert list(sa._CPU_CHOICE.values()) == [faster]
    second = block_sparse_attention(q, k, v, layout)
    assert calls[faster] == (3 if faster == "flex" else 2) and sum(calls.values()) == 4
    for out in (first, second):
        assert F.cosine_similarity(out.flatten(), ref.flatten(), dim=0) >= 0.9999
