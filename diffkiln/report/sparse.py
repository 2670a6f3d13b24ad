"""The report's sparse-attention pictures: each masked layer's block mask per step group and head."""

from __future__ import annotations

import html
from typing import Any

from diffkiln.core.sparse_plan import unpack_mask

__all__ = ["MAX_PICTURES", "mask_pictures", "masks_html"]

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
