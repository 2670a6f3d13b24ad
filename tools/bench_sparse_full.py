"""One call of the full-size Wan2.1-1.3B transformer (random weights) at 480p, with block-sparse
self-attention against dense, side by side in one process.

480p at 81 frames is 21 latent frames of 60 x 104, so 32,760 tokens per attention layer after the
(1, 2, 2) patch. The 30 transformer blocks are identical in shape and cost, so the model is cut to
its first ``--blocks`` blocks (a whole 30-block call takes most of an hour on a 2-core CPU); each
block's time is measured with hooks, and the full call is reported as measured plus extrapolated:
``outside the blocks + 30 x the mean block``, dense and masked alike. Masks: one fixed local window
(the densest whose measured density is at most ``--density``) on every self-attention layer and
head; wall time depends on how many blocks a mask keeps, not which, so a searched mask of the same
density costs the same (the trained model's quality is measured in tools/bench_sparse_video.py).
Batch 1: one classifier-free-guidance branch. The masked kernel is ``--kernel``; ``auto`` on CPU at
this length times the gather kernel and compiled FlexAttention and keeps the faster. The compile
and that choice happen in a warm-up call on one block, outside the timing.

Usage: python tools/bench_sparse_full.py [--density 0.2] [--blocks 2] [--block 128] [--repeat 1]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from diffkiln.core.attention import find_attention_layers
from diffkiln.core.sparse_plan import LayerMasks, SparsePlan, pack_mask
from diffkiln.kernels.sparse_attention import BlockLayout
from diffkiln.nn.sparse_attention import sparse_plan_applied
from diffkiln.optimizer.attention_masks import MaskFamily, TokenGrid, family_mask
from diffkiln.zoo.architectures import build_full_denoiser, full_denoiser_inputs

RESULTS = Path(__file__).resolve().parent / "results"
MODEL = "wan2.1-1.3b"
BLOCKS_IN_MODEL = 30


def _window_mask(grid: TokenGrid, block: int, target: float) -> tuple[tuple[int, int, int], torch.Tensor, float]:
    """The densest local window whose density is at most ``target`` (the sparsest if none is)."""
    best: tuple[tuple[int, int, int], torch.Tensor, float] | None = None
    sparsest: tuple[tuple[int, int, int], torch.Tensor, float] | None = None
    for f in range(grid.frames):
        for r in (0, 1, 2, 4, 8, 16, 1 << 20):
            w = (f, r, r)
            m = family_mask(grid, block, MaskFamily.LOCAL, w)
            d = BlockLayout.from_mask(m[None], grid.tokens, grid.tokens, block).density
            if sparsest is None or d < sparsest[2]:
                sparsest = (w, m, d)
            if d <= target and (best is None or d > best[2]):
                best = (w, m, d)
    chosen = best or sparsest
    assert chosen is not None
    return chosen


def _timed_blocks(model: torch.nn.Module) -> tuple[list[float], list[Any]]:
    """Hooks that record each transformer block's wall time per call."""
    times: list[float] = []
    start: list[float] = []
    handles = []
    for blk in model.blocks:  # type: ignore[union-attr]
        handles.append(blk.register_forward_pre_hook(lambda *_: start.append(time.perf_counter())))
        handles.append(blk.register_forward_hook(lambda *_: times.append(time.perf_counter() - start.pop())))
    return times, handles


def _call(model: torch.nn.Module, inputs: dict[str, Any], times: list[float]) -> dict[str, float]:
    times.clear()
    t0 = time.perf_counter()
    with torch.no_grad():
        model(**inputs)
    total = time.perf_counter() - t0
    blocks = sum(times)
    return {"measured_s": total, "blocks_s": blocks, "mean_block_s": blocks / len(times),
            "full_call_s": total - blocks + BLOCKS_IN_MODEL * blocks / len(times)}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--density", type=float, default=0.2)
    ap.add_argument("--blocks", type=int, default=2, help="transformer blocks kept (of 30)")
    ap.add_argument("--block", type=int, default=128, help="tokens per mask block")
    ap.add_argument("--frames", type=int, default=21, help="latent frames (81 video frames)")
    ap.add_argument("--height", type=int, default=60, help="latent height (480 px)")
    ap.add_argument("--width", type=int, default=104, help="latent width (832 px)")
    ap.add_argument("--kernel", default="auto", choices=["auto", "gather", "flex"])
    ap.add_argument("--repeat", type=int, default=1)
    a = ap.parse_args()
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, {platform.processor() or platform.machine()}")
    model = build_full_denoiser(MODEL)
    model.blocks = model.blocks[: a.blocks]  # type: ignore[index]
    small = full_denoiser_inputs(MODEL, 1, 8, 500.0)
    self_attn = [lay for lay in find_attention_layers(model, lambda: model(**small)) if lay.q_len == lay.kv_len]
    grid = TokenGrid(a.frames, a.height // 2, a.width // 2)
    window, mask, density = _window_mask(grid, a.block, a.density)
    heads = self_attn[0].heads
    packed = ((pack_mask(mask),) * heads,)
    layers = tuple(LayerMasks(lay.name, heads, grid.tokens, grid.tokens, {"frames": grid.frames, "height": grid.height,
                              "width": grid.width, "prefix": 0, "suffix": 0}, ((f"local{window}",) * heads,), packed)
                   for lay in self_attn)  # fmt: skip
    plan = SparsePlan(a.block, 1, 1, (0,), layers, density, max(density, 1e-6), {"fixed": f"local{window}"})
    g = torch.Generator().manual_seed(0)
    inputs = {
        "hidden_states": torch.randn(1, 16, a.frames, a.height, a.width, generator=g),
        "timestep": torch.tensor([500.0]),
        "encoder_hidden_states": torch.randn(1, 512, 4096, generator=g),
    }
    print(f"{grid.tokens} tokens, {len(self_attn)} masked self-attention layers, window {window}, "
          f"density {density:.3f}, blocks of {a.block}")  # fmt: skip
    times, handles = _timed_blocks(model)
    dense_rows, masked_rows = [], []
    kept = model.blocks  # type: ignore[union-attr]
    model.blocks = kept[:1]  # type: ignore[index]
    present = dict(model.named_modules())
    warm_plan = dataclasses.replace(plan, layers=tuple(lm for lm in layers if lm.layer in present))
    with sparse_plan_applied(model, warm_plan, kernel=a.kernel):
        t0 = time.perf_counter()
        # Warm-up: compiles the masked kernel (and lets auto choose one). Every block has the same
        # shapes, so one block settles what all of them run, and a whole masked call is not spent.
        _call(model, inputs, times)
        warm = time.perf_counter() - t0
    model.blocks = kept
    print(f"masked warm-up call (compile included): {warm:.1f} s")
    for _ in range(a.repeat):
        dense_rows.append(_call(model, inputs, times))
        print("dense ", {k: round(v, 2) for k, v in dense_rows[-1].items()})
        with sparse_plan_applied(model, plan, kernel=a.kernel) as run:
            masked_rows.append(_call(model, inputs, times))
            ran = run.density
        print("masked", {k: round(v, 2) for k, v in masked_rows[-1].items()})
    for h in handles:
        h.remove()

    def med(rows: list[dict[str, float]], key: str) -> float:
        return statistics.median(r[key] for r in rows)

    record = {
        "model": MODEL, "tokens": grid.tokens, "blocks_run": a.blocks, "block": a.block, "kernel": a.kernel,
        "window": list(window), "density_planned": round(density, 4), "density_ran": round(ran or 0.0, 4),
        "dense": {k: round(med(dense_rows, k), 2) for k in dense_rows[0]},
        "masked": {k: round(med(masked_rows, k), 2) for k in masked_rows[0]},
        "masked_warmup_s": round(warm, 1),
        "threads": torch.get_num_threads(), "cpu": platform.processor() or platform.machine(),
    }  # fmt: skip
    record["ratio_full_call"] = round(record["masked"]["full_call_s"] / record["dense"]["full_call_s"], 3)
    record["ratio_block"] = round(record["masked"]["mean_block_s"] / record["dense"]["mean_block_s"], 3)
    print(json.dumps(record, indent=2))
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"bench_sparse_full_{a.density}_blocks{a.blocks}.json").write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
