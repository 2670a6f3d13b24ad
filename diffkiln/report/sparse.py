"""The report's sparse-attention section: each masked layer's block mask per step group and head as
pictures, and the speed of the attention layers alone, masked against dense."""

from __future__ import annotations

import html
import statistics
import time
from typing import Any

import torch
import torch.nn.functional as F

from diffkiln.core.sparse_plan import unpack_mask
from diffkiln.kernels.sparse_attention import block_sparse_attention

__all__ = ["MAX_PICTURES", "attention_speed", "mask_pictures", "masks_html"]

MAX_TIMED = 16
"""(layer, step group) layouts timed at most by :func:`attention_speed`."""

MAX_PICTURES = 48
"""Masks drawn at most (layers x step groups x heads, in that order)."""


def mask_pictures(plan: Any) -> list[dict[str, Any]]:
    """Up to :data:`MAX_PICTURES` masks of a :class:`~diffkiln.core.sparse_plan.SparsePlan`, as JSON
    data: layer, step group, head, family, the mask's block counts and its packed bits."""
    out: list[dict[str, Any]] = []
    for lm in plan.layers:
        qb, kb = lm.blocks(plan.block)
        for g in range(len(plan.group_starts)):
            for h in range(lm.heads):
                if len(out) < MAX_PICTURES:
                    out.append({"layer": lm.layer, "group": g, "from_step": plan.group_starts[g], "head": h,
                                "family": lm.families[g][h], "q_blocks": qb, "kv_blocks": kb,
                                "mask": lm.masks[g][h]})  # fmt: skip
    return out


def _svg(picture: dict[str, Any], cell: int = 6) -> str:
    mask = unpack_mask(picture["mask"], picture["q_blocks"], picture["kv_blocks"])
    rows, cols = mask.shape
    rects = "".join(
        f"<rect x='{j * cell}' y='{i * cell}' width='{cell}' height='{cell}'/>"
        for i in range(rows) for j in range(cols) if bool(mask[i, j])
    )  # fmt: skip
    return (f"<svg width='{cols * cell}' height='{rows * cell}' style='background:#eee;fill:#2a6'>"
            f"{rects}</svg>")  # fmt: skip


def masks_html(pictures: list[dict[str, Any]]) -> str:
    """The pictures as a grid: rows are query blocks, columns key blocks, green kept."""
    cells = "".join(
        f"<div class=cell style='width:auto'>{_svg(p)}<div>{html.escape(p['layer'])} steps {p['from_step']}+ head "
        f"{p['head']}: {html.escape(p['family'])}</div></div>"
        for p in pictures
    )  # fmt: skip
    return ("<h2>Sparse-attention masks (rows: query blocks, columns: key blocks; green: kept)</h2>"
            f"<div class=grid>{cells}</div>")  # fmt: skip


def _now(device: torch.device) -> float:
    if device.type == "cuda":  # kernels run asynchronously: wait for them before reading the clock
        torch.cuda.synchronize(device)
    return time.perf_counter()


def attention_speed(run: Any, repeat: int = 3) -> dict[str, Any] | None:
    """Attention alone, masked against dense: each masked layer's layouts (up to :data:`MAX_TIMED`)
    replayed on random inputs of the shape it ran at, through the kernel it ran on and through dense
    SDPA, interleaved so both see the same machine state; the median of ``repeat`` rounds.

    Returns:
        ``{"speedup", "dense_seconds", "masked_seconds", "layouts_timed", "kernel"}``, or None when
        no masked call ran.
    """
    plan = run.plan
    jobs = [(lm.layer, g) for lm in plan.layers if lm.layer in run.shapes for g in range(len(plan.group_starts))]
    if not jobs:
        return None
    dense_t, masked_t = 0.0, 0.0
    gen = torch.Generator().manual_seed(0)
    for layer, group in jobs[:MAX_TIMED]:
        shape, dtype, device = run.shapes[layer]
        layout = run.layout(layer, group)
        q = torch.randn(*shape, generator=gen).to(device, dtype)
        k = torch.randn(shape[0], shape[1], layout.kv_len, shape[3], generator=gen).to(device, dtype)
        block_sparse_attention(q, k, k, layout, kernel=run.kernel)  # warm-up (a compiled kernel compiles here)
        rounds: list[tuple[float, float]] = []
        for _ in range(repeat):
            t0 = _now(device)
            F.scaled_dot_product_attention(q, k, k)
            t1 = _now(device)
            block_sparse_attention(q, k, k, layout, kernel=run.kernel)
            rounds.append((t1 - t0, _now(device) - t1))
        dense_t += statistics.median(r[0] for r in rounds)
        masked_t += statistics.median(r[1] for r in rounds)
    return {"speedup": round(dense_t / max(masked_t, 1e-12), 3), "dense_seconds": round(dense_t, 5),
            "masked_seconds": round(masked_t, 5), "layouts_timed": min(len(jobs), MAX_TIMED),
            "kernel": run.kernel.value}  # fmt: skip
