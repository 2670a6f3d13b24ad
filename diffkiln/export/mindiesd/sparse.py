"""A bundle's sparse-attention masks in the two forms MindIE-SD takes, and how exactly each fits.

From MindIE-SD's source (``mindiesd/layers/flash_attn/sparse_flash_attn.py`` and
``sparse_flash_attn_rf_v3.py``):

* ``sparse_attention(q, k, v, sparse_type="rf_v3", sparsity=s, txt_len=n, latent_shape_q=[t, h, w],
  block_size=128, input_layout="BSND")`` chooses its blocks *online* on every call: it moves the
  first ``txt_len`` tokens (text) behind the video tokens, re-tiles each frame into 8x8 patches,
  pools 128-token blocks, and keeps per query block the ``ceil(blocks * (1 - s))`` key blocks of
  highest pooled score, plus every text and first-frame block. It only supports blocks of 128
  tokens and self-attention over ``t*h*w (+ txt_len)`` tokens. So a diffkiln plan maps onto it only
  as its per-layer, per-step-group sparsity: the same budget, not the same masks.
* Inside it, ``rain_fusion_attention(q, k, v, select_idx, select_num_idx, blockshape=[128, 128],
  input_layout="TND", ...)`` runs given blocks: ``select_idx`` is ``(query_blocks, heads,
  key_blocks)`` int64, each row the kept key blocks ascending and then -1; ``select_num_idx`` is
  ``(query_blocks, heads)``, the kept counts; one mask serves the whole batch. That form holds a
  frozen plan exactly, in the model's own token order, when the plan's blocks are 128 tokens. A
  plan of smaller blocks is coarsened to 128 (a coarse block runs when any of its fine blocks
  does), which keeps every planned block and raises the density; the export records both.

:func:`mindiesd_sparse_export` writes both: ``mindiesd_sparse_attention.json`` (per layer: the
``sparse_attention`` arguments, or why none fit, and the exact masks' tensor names) and
``mindiesd_sparse_masks.safetensors`` (``{layer}.group{g}.select_idx`` / ``.select_num_idx``).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from diffkiln.core.sparse_plan import LayerMasks, SparsePlan

__all__ = ["MINDIESD_BLOCK", "SPARSE_CONFIG_FILE", "SPARSE_MASKS_FILE", "coarsen_block_mask",
           "mindiesd_sparse_export", "rain_fusion_indices"]  # fmt: skip

MINDIESD_BLOCK = 128
"""The one block size MindIE-SD's sparse attention supports (``block_size``, ``blockshape``)."""
SPARSE_CONFIG_FILE = "mindiesd_sparse_attention.json"
"""Per masked layer: MindIE-SD ``sparse_attention`` arguments and the exact masks' tensor names."""
SPARSE_MASKS_FILE = "mindiesd_sparse_masks.safetensors"
"""The frozen masks as ``rain_fusion_attention``'s ``select_idx`` / ``select_num_idx``."""


def coarsen_block_mask(mask: torch.Tensor, q_len: int, kv_len: int, block: int, coarse: int) -> torch.Tensor:
    """A ``(..., q_blocks, kv_blocks)`` mask at ``block`` tokens as one at ``coarse`` tokens: a
    coarse block runs when any token pair inside it ran before (so nothing planned is dropped)."""
    token = mask.repeat_interleave(block, -2).repeat_interleave(block, -1)[..., :q_len, :kv_len]
    qc, kc = math.ceil(q_len / coarse), math.ceil(kv_len / coarse)
    padded = token.new_zeros(*token.shape[:-2], qc * coarse, kc * coarse)
    padded[..., :q_len, :kv_len] = token
    return padded.view(*token.shape[:-2], qc, coarse, kc, coarse).any(-1).any(-2)


def rain_fusion_indices(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(select_idx, select_num_idx)`` of a ``(heads, q_blocks, kv_blocks)`` boolean mask, laid out
    as MindIE-SD's ``get_blockwise_mask`` hands them to ``rain_fusion_attention``."""
    kv = mask.shape[-1]
    cols = torch.arange(kv).expand_as(mask)
    ordered = torch.sort(torch.where(mask, cols, kv), dim=-1).values
    select = torch.where(ordered < kv, ordered, -1).to(torch.int64)
    return select.transpose(0, 1).contiguous(), mask.sum(-1).to(torch.int64).transpose(0, 1).contiguous()


def _token_density(mask: torch.Tensor, q_len: int, kv_len: int, block: int) -> float:
    token = mask.repeat_interleave(block, -2).repeat_interleave(block, -1)[..., :q_len, :kv_len]
    return float(token.float().mean())


def _rf_v3_form(lm: LayerMasks) -> tuple[dict[str, Any] | None, str]:
    """``sparse_attention``'s ``rf_v3`` arguments for a layer, or None with the reason."""
    g = lm.grid
    if lm.q_len != lm.kv_len:
        return None, "rf_v3 is self-attention over the same tokens; this layer's keys differ from its queries"
    if g.get("suffix", 0):
        return None, "rf_v3 takes the text tokens first in the sequence; this layer has tokens after its video grid"
    if g["frames"] * g["height"] * g["width"] + g.get("prefix", 0) != lm.q_len:
        return None, "the layer's tokens are not a (frames, height, width) grid plus leading text"
    return {"sparse_type": "rf_v3", "block_size": MINDIESD_BLOCK, "txt_len": g.get("prefix", 0),
            "latent_shape_q": [g["frames"], g["height"], g["width"]],
            "latent_shape_k": [g["frames"], g["height"], g["width"]]}, ""  # fmt: skip


def mindiesd_sparse_export(plan: SparsePlan) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The config (for :data:`SPARSE_CONFIG_FILE`) and the tensors (for :data:`SPARSE_MASKS_FILE`)
    of a plan; see the module docstring."""
    tensors: dict[str, torch.Tensor] = {}
    layers = []
    fine_pairs = coarse_pairs = total = 0.0
    for lm in plan.layers:
        rf, why = _rf_v3_form(lm)
        sparsity, names = [], []
        for group in range(len(plan.group_starts)):
            fine = torch.stack([lm.mask(group, h, plan.block) for h in range(lm.heads)])
            coarse = (fine if plan.block == MINDIESD_BLOCK
                      else coarsen_block_mask(fine, lm.q_len, lm.kv_len, plan.block, MINDIESD_BLOCK))  # fmt: skip
            select, count = rain_fusion_indices(coarse)
            key = f"{lm.layer}.group{group}"
            tensors[f"{key}.select_idx"], tensors[f"{key}.select_num_idx"] = select, count
            names.append(key)
            d_fine = _token_density(fine, lm.q_len, lm.kv_len, plan.block)
            d_coarse = _token_density(coarse, lm.q_len, lm.kv_len, MINDIESD_BLOCK)
            sparsity.append(round(1.0 - d_fine, 4))
            pairs = lm.heads * lm.q_len * lm.kv_len
            fine_pairs, coarse_pairs = fine_pairs + d_fine * pairs, coarse_pairs + d_coarse * pairs
            total += pairs
        entry: dict[str, Any] = {"layer": lm.layer, "heads": lm.heads, "q_len": lm.q_len, "kv_len": lm.kv_len,
                                 "rain_fusion_masks": names}  # fmt: skip
        entry["sparse_attention"] = {**rf, "sparsity": sparsity} if rf is not None else None
        if rf is None:
            entry["sparse_attention_not_expressible"] = why
        layers.append(entry)
    exact = plan.block == MINDIESD_BLOCK
    config = {
        "block_size": MINDIESD_BLOCK,
        "plan_block": plan.block,
        "steps": plan.steps,
        "calls_per_step": plan.calls_per_step,
        "group_starts": list(plan.group_starts),
        "masked_density": round(fine_pairs / max(total, 1.0), 4),
        "masked_density_at_128": round(coarse_pairs / max(total, 1.0), 4),
        "rain_fusion_attention": {
            "exact": exact,
            "note": "the plan's masks, unchanged" if exact else
                    f"the plan's {plan.block}-token blocks coarsened to 128 (a coarse block runs when any of its "
                    "fine blocks does): every planned block runs, at the higher masked_density_at_128",
        },
        "sparse_attention": {
            "exact": False,
            "note": "rf_v3 re-selects its blocks online from pooled scores at the given sparsity (plus every "
                    "text and first-frame block); it keeps the plan's budget per layer and step group, not its "
                    "masks",
        },
        "layers": layers,
    }  # fmt: skip
    return config, tensors
