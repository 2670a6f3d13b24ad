"""Block-sparse attention: a compact block layout, a dense masked reference, and a CPU kernel that
really skips the blocks the layout drops.

A :class:`BlockLayout` splits the query and key sequences into blocks of ``block`` tokens (the last
one may be shorter) and keeps, per head and query block, a list of key blocks. It is stored as
indices (``(heads, query blocks, max kept)``, padded with -1), not as a dense boolean tensor.

* :func:`sparse_attention_reference`: SDPA over every key with the layout expanded to a token mask
  (pure torch; the contract every kernel is checked against);
* :func:`block_sparse_attention`: runs only the kept blocks, through the kernel
  :class:`SparseKernel` picks: gathering each query block's kept key/value blocks and running
  attention on them, batched per chunk of query blocks (``gather``: two GEMMs and an in-place
  softmax for float32 on CPU, SDPA otherwise), or FlexAttention compiled (``flex``).

Which is faster on CPU depends on the run and the CPU: compiled FlexAttention is faster than
``gather`` per call on long layers on some CPUs and slower on others (BENCHMARKS.md), and
compiling costs tens of seconds per new shape (once per process, less with inductor's on-disk
cache), which a short run of short layers never earns back. ``auto`` therefore takes FlexAttention
on CUDA always; on CPU, for layers of at least :data:`FLEX_MIN_TOKENS` query tokens when a C++
compiler is present, it times both kernels on each shape's first call and keeps the faster,
``gather`` if compiling fails.
"""

from __future__ import annotations

import functools
import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import TypeVar

import torch
import torch.nn.functional as F

__all__ = ["FLEX_MIN_TOKENS", "BlockLayout", "SparseKernel", "block_sparse_attention", "npu_block_sparse_attention",
           "sparse_attention_reference"]  # fmt: skip

log = logging.getLogger(__name__)

FLEX_MIN_TOKENS = 4096
"""Query tokens from which ``auto`` compiles FlexAttention on CPU (shorter layers gather)."""


class SparseKernel(str, Enum):
    """The kernel :func:`block_sparse_attention` runs kept blocks with."""

    AUTO = "auto"
    """CUDA: compiled FlexAttention; NPU: ``gather`` on ``npu_fusion_attention``; CPU: from
    :data:`FLEX_MIN_TOKENS` query tokens where a C++ compiler exists, the faster of the two as timed
    on each call shape's first call, else ``gather``."""
    GATHER = "gather"
    """Gather each query block's kept key/value blocks and run attention on them (any device)."""
    FLEX = "flex"
    """FlexAttention with a ``BlockMask``, compiled on CUDA and CPU (``gather`` if compiling fails)."""


_T = TypeVar("_T")
_FLEX_FAILED: set[str] = set()
_CPU_CHOICE: dict[tuple[object, ...], str] = {}
"""``auto``'s measured kernel per call shape on CPU (:func:`_measured_cpu_choice`)."""

_CHUNK_BYTES = 32 << 20
"""Gathered key/value bytes per batched SDPA call (at least one row per thread): bounds the
kernel's extra memory, and a chunk's keys are still in cache when attention reads them (the
chunk sizes compared: docs/sparse-attention.md)."""
_MATMUL_CHUNK_BYTES = 8 << 20
"""The same for :func:`_matmul_softmax`, whose scores are as large as the keys: smaller chunks keep
keys, scores and values in cache together."""


@dataclass(frozen=True)
class BlockLayout:
    """Which key blocks each query block of each head attends to.

    Attributes:
        indices: ``(heads, query_blocks, max_kept)`` int32 key-block indices, ascending per row,
            padded with -1.
        q_len: query tokens.
        kv_len: key tokens.
        block: tokens per block (the last block of either sequence may be shorter).
    """

    indices: torch.Tensor
    q_len: int
    kv_len: int
    block: int

    def __post_init__(self) -> None:
        if self.block <= 0:
            raise ValueError(f"block must be positive, got {self.block}")
        if self.indices.dim() != 3 or self.indices.dtype != torch.int32:
            raise ValueError("indices must be an int32 tensor (heads, query_blocks, max_kept)")
        if self.indices.shape[1] != self.q_blocks:
            raise ValueError(
                f"the layout has {self.indices.shape[1]} query blocks; {self.q_len} tokens in blocks of "
                f"{self.block} make {self.q_blocks}"
            )
        bad = (self.indices < -1) | (self.indices >= self.kv_blocks)
        if bool(bad.any()):
            raise ValueError(f"key-block indices must lie in [0, {self.kv_blocks}) (or -1 for padding)")
        if bool((self.indices[..., 0] < 0).any()):
            raise ValueError("every query block must keep at least one key block (softmax over nothing)")

    @property
    def heads(self) -> int:
        """Heads the layout covers."""
        return int(self.indices.shape[0])

    @property
    def q_blocks(self) -> int:
        """Query blocks: ``ceil(q_len / block)``."""
        return -(-self.q_len // self.block)

    @property
    def kv_blocks(self) -> int:
        """Key blocks: ``ceil(kv_len / block)``."""
        return -(-self.kv_len // self.block)

    @classmethod
    def from_mask(cls, mask: torch.Tensor, q_len: int, kv_len: int, block: int) -> BlockLayout:
        """The layout of a ``(heads, query_blocks, key_blocks)`` boolean block mask."""
        counts = mask.sum(-1)
        width = max(int(counts.max()), 1)
        # Kept blocks first, in ascending order: sort by (dropped, index).
        order = torch.argsort((~mask).to(torch.int64) * mask.shape[-1] + torch.arange(mask.shape[-1]), dim=-1)
        idx = order[..., :width].to(torch.int32)
        keep = torch.arange(width) < counts.unsqueeze(-1)
        return cls(torch.where(keep, idx, torch.full_like(idx, -1)), q_len, kv_len, block)

    def to_mask(self) -> torch.Tensor:
        """The ``(heads, query_blocks, key_blocks)`` boolean block mask."""
        mask = torch.zeros(self.heads, self.q_blocks, self.kv_blocks + 1, dtype=torch.bool)
        mask.scatter_(-1, torch.where(self.indices < 0, self.kv_blocks, self.indices).long(), True)
        return mask[..., :-1]

    def token_mask(self) -> torch.Tensor:
        """The ``(heads, q_len, kv_len)`` boolean token mask (True: attend)."""
        m = self.to_mask().repeat_interleave(self.block, 1).repeat_interleave(self.block, 2)
        return m[:, : self.q_len, : self.kv_len]

    @functools.cached_property
    def keeps_every_block(self) -> bool:
        """Whether every query block of every head keeps every key block (a dense layout). Cached:
        a layout is immutable and this is asked on every attention call."""
        return self.indices.shape[-1] == self.kv_blocks and bool((self.indices >= 0).all())

    @property
    def density(self) -> float:
        """Kept (query, key) token pairs over all pairs: the share of attention FLOPs that runs."""
        q_sizes = torch.full((self.q_blocks,), self.block)
        q_sizes[-1] = self.q_len - self.block * (self.q_blocks - 1)
        kv_sizes = torch.full((self.kv_blocks + 1,), self.block)
        kv_sizes[-2] = self.kv_len - self.block * (self.kv_blocks - 1)
        kv_sizes[-1] = 0  # padding slots
        kept = kv_sizes[torch.where(self.indices < 0, self.kv_blocks, self.indices).long()].sum(-1)
        return float((kept * q_sizes).sum()) / (self.heads * self.q_len * self.kv_len)


def _check(q: torch.Tensor, k: torch.Tensor, layout: BlockLayout) -> None:
    if q.dim() != 4 or k.dim() != 4:
        raise ValueError("q, k and v must be (batch, heads, tokens, head_dim)")
    if q.shape[1] != layout.heads or q.shape[2] != layout.q_len or k.shape[2] != layout.kv_len:
        raise ValueError(
            f"the layout is for {layout.heads} heads, {layout.q_len} query and {layout.kv_len} key tokens; got "
            f"{q.shape[1]} heads, {q.shape[2]} query and {k.shape[2]} key tokens (another resolution or frame "
            "count than the mask was searched for)"
        )


def sparse_attention_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: BlockLayout, scale: float | None = None
) -> torch.Tensor:
    """Dense SDPA with the layout as a token mask: the contract of every block-sparse kernel.

    Args:
        q: ``(batch, heads, q_len, head_dim)``.
        k: ``(batch, heads, kv_len, head_dim)``.
        v: ``(batch, heads, kv_len, head_dim_v)``.
        layout: the kept blocks.
        scale: softmax scale; None: ``1/sqrt(head_dim)``.

    Raises:
        ValueError: the shapes do not fit the layout.
    """
    _check(q, k, layout)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=layout.token_mask().to(q.device), scale=scale)


def _block_rows(x: torch.Tensor, block: int, blocks: int) -> torch.Tensor:
    """``(batch, heads, tokens, d)`` -> ``(batch * heads * blocks, block * d)``: one row per block
    (the last zero-padded to a whole block). A view, not a copy, where the tokens fill whole blocks
    and ``x`` is contiguous."""
    b, h, n, d = x.shape
    if n != blocks * block:
        x = F.pad(x, (0, 0, 0, blocks * block - n))
    return x.reshape(b * h * blocks, block * d)


Attend = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, "torch.Tensor | None", "float | None"], torch.Tensor]
"""``(q, k, v, valid, scale) -> out`` on 4-D ``(batch, rows, tokens, dim)`` runs; ``valid``
``(1, rows, 1, keys)`` True where a key slot holds a real token, or None when all do."""


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor | None,
          scale: float | None) -> torch.Tensor:  # fmt: skip
    return F.scaled_dot_product_attention(q, k, v, attn_mask=valid, scale=scale)


def _matmul_softmax(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor | None,
                    scale: float | None, scratch: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
    """Attention on a chunk of gathered runs as two batched matmuls and a softmax done in place on the
    scores: each run's scores stay in cache between the matmuls, and the GEMMs are whole runs long
    (CPU SDPA splits each 128-query run into 32-query tiles, whose small GEMMs run below peak).
    ``scratch``, when given, holds the scores (at least ``batch * rows * tokens * keys`` elements):
    reused across chunks, it spares faulting in fresh pages for every chunk."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    b, r, n, d = q.shape
    m = k.shape[2]
    q3, k3, v3 = q.reshape(b * r, n, d), k.reshape(b * r, m, d), v.reshape(b * r, m, -1)
    scores = q.new_empty(b * r, n, m) if scratch is None else scratch[: b * r * n * m].view(b * r, n, m)
    torch.baddbmm(scores, q3, k3.transpose(1, 2), beta=0.0, alpha=scale, out=scores)  # scale in the GEMM
    if valid is not None:
        scores.view(b, r, n, m).masked_fill_(~valid, float("-inf"))
    scores.sub_(scores.amax(-1, keepdim=True)).exp_()
    total = scores.sum(-1, keepdim=True)
    return torch.bmm(scores, v3).div_(total).view(b, r, n, -1)


def _run_attend(q: torch.Tensor) -> Attend:
    """The attention op the gather kernel runs its runs with: ``npu_fusion_attention`` on an NPU,
    :func:`_matmul_softmax` for float32/float64 on CPU, SDPA otherwise (a low-precision softmax
    is left to SDPA, which accumulates in float32)."""
    if q.device.type == "npu":
        return _npu_fusion
    if q.device.type == "cpu" and q.dtype in (torch.float32, torch.float64):
        return _matmul_softmax
    return _sdpa


def _chunk_bytes(attend: Attend) -> int:
    return _MATMUL_CHUNK_BYTES if attend is _matmul_softmax else _CHUNK_BYTES


def _npu_fusion(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor | None,
                scale: float | None) -> torch.Tensor:  # fmt: skip
    import importlib

    torch_npu = importlib.import_module("torch_npu")
    rows = q.shape[1]
    # npu_fusion_attention masks where atten_mask is True (the opposite of SDPA's boolean mask).
    masked = None if valid is None else (~valid).expand(q.shape[0], rows, q.shape[2], valid.shape[-1])
    out = torch_npu.npu_fusion_attention(q, k, v, rows, "BNSD", atten_mask=masked,
                                         scale=q.shape[-1] ** -0.5 if scale is None else scale)  # fmt: skip
    result: torch.Tensor = out[0]
    return result


@functools.cache
def _has_compiler() -> bool:
    """Whether inductor can build CPU kernels (looked up once, not on every attention call)."""
    return shutil.which("c++") is not None


def _use_flex(q: torch.Tensor, layout: BlockLayout, kernel: SparseKernel) -> bool:
    device = q.device.type
    if device not in ("cuda", "cpu") or kernel is SparseKernel.GATHER or device in _FLEX_FAILED:
        return False
    if kernel is SparseKernel.FLEX or device == "cuda":
        return True
    return layout.q_len >= FLEX_MIN_TOKENS and _has_compiler()


def _shape_key(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: BlockLayout) -> tuple[object, ...]:
    return tuple(q.shape), tuple(k.shape), v.shape[-1], layout.block, q.dtype


def _timed(fn: Callable[[], _T]) -> tuple[_T, float]:
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def _flex(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: BlockLayout,
          scale: float | None) -> torch.Tensor | None:  # fmt: skip
    """Compiled FlexAttention, or None where compiling fails on this device (then remembered)."""
    from diffkiln.kernels.sparse_flex import flex_block_sparse_attention

    try:
        return flex_block_sparse_attention(q, k, v, layout, scale, compiled=True)
    except Exception as exc:
        if q.device.type == "cuda":
            raise
        _FLEX_FAILED.add(q.device.type)
        log.warning("compiled FlexAttention failed on %s (%s); using the gather kernel", q.device.type, exc)
        return None


def _measured_cpu_choice(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: BlockLayout,
                         scale: float | None) -> torch.Tensor:  # fmt: skip
    """``auto`` on a long CPU layer: the first call of each shape runs both kernels, times them
    (FlexAttention after its compile) and keeps the faster for that shape; later calls run it."""
    key = _shape_key(q, k, v, layout)
    choice = _CPU_CHOICE.get(key)
    if choice == "flex":
        out = _flex(q, k, v, layout, scale)
        if out is not None:
            return out
    if choice is not None:
        return _gathered(q, k, v, layout, scale, _run_attend(q))
    gathered, gather_s = _timed(lambda: _gathered(q, k, v, layout, scale, _run_attend(q)))
    _CPU_CHOICE[key] = "gather"
    if _flex(q, k, v, layout, scale) is not None:  # compiles
        flex_out, flex_s = _timed(lambda: _flex(q, k, v, layout, scale))
        if flex_out is not None and flex_s < gather_s:
            _CPU_CHOICE[key] = "flex"
        log.info("sparse attention at %s: gather %.3f s, FlexAttention %.3f s; keeping %s", key[0], gather_s,
                 flex_s, _CPU_CHOICE[key])  # fmt: skip
    return gathered


def block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: BlockLayout,
    scale: float | None = None,
    kernel: SparseKernel = SparseKernel.AUTO,
) -> torch.Tensor:
    """Attention over the layout's kept blocks only (same contract as :func:`sparse_attention_reference`).

    Each (head, query block) row's kept key and value blocks are gathered into one contiguous run
    and attention runs on that run alone, batched over rows. Rows are taken in order of how many
    blocks they keep, so a batch pads few slots; padding slots and the short last key block are
    masked. Work and memory traffic scale with the number of kept blocks. The attention op per
    device: on CPU two batched GEMMs with the softmax in place between them for float32/float64
    (:func:`_matmul_softmax`), SDPA for other dtypes; on an Ascend NPU
    ``torch_npu.npu_fusion_attention`` on the same gathered runs
    (:func:`npu_block_sparse_attention`). Or, as ``kernel`` picks (:class:`SparseKernel`),
    FlexAttention's compiled block-sparse kernels
    (:func:`diffkiln.kernels.sparse_flex.flex_block_sparse_attention`).

    Raises:
        ValueError: the shapes do not fit the layout.
    """
    _check(q, k, layout)
    if layout.keeps_every_block:
        # A dense step group or layer (the search keeps some): one plain attention call is the same
        # computation without the gathers, which cost more than they save when nothing is skipped.
        return (_npu_fusion if q.device.type == "npu" else _sdpa)(q, k, v, None, scale)
    if _use_flex(q, layout, SparseKernel(kernel)):
        if q.device.type == "cpu" and SparseKernel(kernel) is SparseKernel.AUTO:
            return _measured_cpu_choice(q, k, v, layout, scale)
        out = _flex(q, k, v, layout, scale)
        if out is not None:
            return out
    return _gathered(q, k, v, layout, scale, _run_attend(q))


def npu_block_sparse_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: BlockLayout, scale: float | None = None
) -> torch.Tensor:
    """The NPU path of :func:`block_sparse_attention`: the gathered runs through
    ``torch_npu.npu_fusion_attention`` (BNSD, one "head" per row), whatever the tensors' device
    (tests run it on CPU with torch_npu emulated).

    Raises:
        ValueError: the shapes do not fit the layout.
        ModuleNotFoundError: torch_npu is not installed.
    """
    _check(q, k, layout)
    if layout.keeps_every_block:
        return _npu_fusion(q, k, v, None, scale)
    return _gathered(q, k, v, layout, scale, _npu_fusion)


def _gathered(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: BlockLayout, scale: float | None,
              attend: Attend) -> torch.Tensor:  # fmt: skip
    batch, heads, q_len, _ = q.shape
    blk, qb, kb = layout.block, layout.q_blocks, layout.kv_blocks
    k_rows, v_rows = _block_rows(k, blk, kb), _block_rows(v, blk, kb)
    qp = q if q_len == qb * blk else F.pad(q, (0, 0, 0, qb * blk - q_len))
    qp = qp.reshape(batch, heads * qb, blk, q.shape[-1])
    slots = torch.where(layout.indices < 0, kb, layout.indices).long().to(q.device).view(heads * qb, -1)
    head_of = torch.arange(heads, device=q.device).repeat_interleave(qb)
    counts = (layout.indices >= 0).sum(-1).view(-1).to(q.device)
    order = torch.argsort(counts, stable=True)
    # Key slots that hold a real token: not a padding slot (index kb), not past kv_len in the last
    # block. A padding slot reads block 0 and is masked, so no zero block has to be appended.
    valid_block = torch.zeros(kb + 1, blk, dtype=torch.bool, device=q.device)
    valid_block.view(-1)[: layout.kv_len] = True
    out = q.new_empty(batch, heads * qb, blk, v.shape[-1])
    max_width = int(counts[order[-1]])
    per_row = batch * blk * (k.shape[-1] + v.shape[-1]) * k.element_size() * max_width
    n_rows = max(torch.get_num_threads(), _chunk_bytes(attend) // max(per_row, 1))
    # Blocks gathered with index_select into buffers reused by every chunk: advanced indexing into
    # fresh tensors spent most of its time faulting in new pages.
    k_buf = k.new_empty(batch * min(n_rows, len(order)) * max_width, k_rows.shape[1])
    v_buf = v.new_empty(batch * min(n_rows, len(order)) * max_width, v_rows.shape[1])
    if attend is _matmul_softmax:
        attend = functools.partial(_matmul_softmax, scratch=q.new_empty(k_buf.shape[0] * blk * blk))
    batch_of = torch.arange(batch, device=q.device)[:, None, None] * (heads * kb)
    start = 0
    while start < len(order):
        rows = order[start : start + n_rows]
        width = int(counts[rows[-1]])
        keys = slots[rows, :width]  # (r, width)
        source = (head_of[rows][:, None] * kb + torch.where(keys == kb, 0, keys))[None]
        table = (batch_of + source).view(-1)  # (batch, r, width)
        n = table.numel()
        kg = torch.index_select(k_rows, 0, table, out=k_buf[:n]).view(batch, len(rows), width * blk, -1)
        vg = torch.index_select(v_rows, 0, table, out=v_buf[:n]).view(batch, len(rows), width * blk, -1)
        valid = valid_block[keys].reshape(1, len(rows), 1, width * blk)
        ran = attend(qp.index_select(1, rows), kg, vg, None if bool(valid.all()) else valid, scale)
        out.index_copy_(1, rows, ran)
        start += len(rows)
    return out.view(batch, heads, qb * blk, -1)[:, :, :q_len]
