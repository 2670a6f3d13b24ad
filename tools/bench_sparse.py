"""Block-sparse attention on CPU, the attention layer alone, side by side in one run.

Wan2.1-1.3B geometry by default (12 heads x 128, batch 1), at each ``--tokens`` length and
``--densities`` density: dense SDPA, diffkiln's :func:`block_sparse_attention` (blocks of 64 and of
128 tokens; ``gather`` kernel), and compiled FlexAttention with the same block mask (blocks of 128;
``flex`` kernel). ``auto`` on CPU at these lengths times these two on each shape's first call and
keeps the faster (for blocks of 128: the faster of those two columns). Each mask keeps the same number of
key blocks in every row: the first block (a sink), a band around the diagonal, and random blocks up
to the density. Reported: median seconds of ``--repeat`` calls,
speed-up against dense, the layout's measured density, and each output's cosine against the dense
masked reference (float32).

Usage: python tools/bench_sparse.py [--tokens 8192 16384 32768] [--densities 0.5 0.35 0.2]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from diffkiln.kernels.sparse_attention import (
    BlockLayout,
    SparseKernel,
    block_sparse_attention,
    sparse_attention_reference,
)

ROOT = Path(__file__).resolve().parents[1]


def _mask(heads: int, blocks: int, density: float, seed: int) -> torch.Tensor:
    """Every row keeps ``round(density * blocks)`` blocks: the sink, a diagonal band, random others."""
    g = torch.Generator().manual_seed(seed)
    keep = max(1, round(density * blocks))
    mask = torch.zeros(heads, blocks, blocks, dtype=torch.bool)
    for h in range(heads):
        for i in range(blocks):
            chosen = [0, *range(max(0, i - 1), min(blocks, i + 2))]
            rest = [j for j in torch.randperm(blocks, generator=g).tolist() if j not in chosen]
            row = list(dict.fromkeys(chosen))[:keep] + rest[: max(0, keep - len(set(chosen)))]
            mask[h, i, row] = True
    return mask


def _time(fn: Callable[[], torch.Tensor], repeat: int) -> tuple[float, torch.Tensor]:
    out = fn()  # warm-up (and compilation)
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return round(float(F.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0)), 6)


def _reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: BlockLayout) -> tuple[torch.Tensor, int]:
    """The dense masked reference, on the first head only past 8k tokens (its token mask is
    heads x tokens^2 bytes: 12.9 GB at 32k for all heads); returns (output, heads covered)."""
    if q.shape[2] <= 8192:
        return sparse_attention_reference(q, k, v, layout), q.shape[1]
    one = BlockLayout(layout.indices[:1].contiguous(), layout.q_len, layout.kv_len, layout.block)
    return sparse_attention_reference(q[:, :1], k[:, :1], v[:, :1], one), 1


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, nargs="+", default=[8192, 16384, 32768])
    ap.add_argument("--densities", type=float, nargs="+", default=[0.5, 0.35, 0.2])
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--no-flex", action="store_true", help="skip FlexAttention (needs a C++ compiler)")
    ap.add_argument(
        "--results",
        type=Path,
        default=None,
        help="where to write the JSON (default tools/results/bench_sparse_layer_<tokens>.json)",
    )
    a = ap.parse_args()
    rows = []
    for n in a.tokens:
        g = torch.Generator().manual_seed(n)
        q, k, v = (torch.randn(1, a.heads, n, a.head_dim, generator=g) for _ in range(3))
        dense_s, _ = _time(lambda q=q, k=k, v=v: F.scaled_dot_product_attention(q, k, v), a.repeat)
        for density in a.densities:
            row: dict[str, Any] = {"tokens": n, "density_asked": density, "dense_s": round(dense_s, 3)}
            for block in (64, 128):
                blocks = -(-n // block)
                layout = BlockLayout.from_mask(_mask(a.heads, blocks, density, seed=block), n, n, block)
                seconds, out = _time(lambda L=layout, q=q, k=k, v=v: block_sparse_attention(q, k, v, L, None,
                                                                                             SparseKernel.GATHER),
                                     a.repeat)  # fmt: skip
                ref, heads = _reference(q, k, v, layout)
                row[f"diffkiln_b{block}_s"] = round(seconds, 3)
                row[f"diffkiln_b{block}_speedup"] = round(dense_s / seconds, 2)
                row[f"density_b{block}"] = round(layout.density, 4)
                row[f"cos_b{block}"] = _cos(out[:, :heads], ref)
                if block == 128 and not a.no_flex:
                    try:
                        seconds, out = _time(lambda L=layout, q=q, k=k, v=v: block_sparse_attention(
                            q, k, v, L, None, SparseKernel.FLEX), a.repeat)  # fmt: skip
                        row["flex_b128_s"], row["flex_b128_speedup"] = round(seconds, 3), round(dense_s / seconds, 2)
                        row["cos_flex"] = _cos(out[:, :heads], ref)
                    except Exception as exc:  # compilation failures are reported, not fatal
                        row["flex_b128_s"] = f"failed: {type(exc).__name__}: {str(exc)[:120]}"
                row["reference_heads"] = heads
            rows.append(row)
            print(json.dumps(row), flush=True)
    out = a.results or ROOT / "tools" / "results" / f"bench_sparse_layer_{'_'.join(map(str, a.tokens))}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    machine = {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
               "torch": torch.__version__}  # fmt: skip
    out.write_text(json.dumps({"machine": machine, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
