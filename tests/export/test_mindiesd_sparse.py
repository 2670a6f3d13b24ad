"""Sparse-attention masks exported for MindIE-SD, run by its ``rain_fusion_attention`` as
re-implemented from its source (tests/export/mindiesd_sparse_contract.py), against the plan's
masks through diffkiln's dense masked reference."""

from __future__ import annotations

import pytest
import torch

from diffkiln.core.sparse_plan import LayerMasks, SparsePlan, pack_mask
from diffkiln.export.mindiesd.sparse import mindiesd_sparse_export
from diffkiln.kernels.sparse_attention import BlockLayout, sparse_attention_reference
from tests.export.mindiesd_sparse_contract import ContractError, rain_fusion_attention

HEADS, DIM, GRID = 2, 16, {"frames": 5, "height": 8, "width": 8, "prefix": 0, "suffix": 0}


def _plan(block: int, tokens: int, grid: dict[str, int], seed: int = 0) -> SparsePlan:
    gen = torch.Generator().manual_seed(seed)
    nb = -(-tokens // block)
    groups = []
    for _ in range(2):  # two step groups
        heads = []
        for _ in range(HEADS):
            mask = torch.rand(nb, nb, generator=gen) < 0.3
            mask |= torch.eye(nb, dtype=torch.bool)  # every row keeps a block
            heads.append(pack_mask(mask))
        groups.append(tuple(heads))
    layer = LayerMasks("blocks.0.attn1", HEADS, tokens, tokens, dict(grid), (("topk",) * HEADS,) * 2, tuple(groups))
    return SparsePlan(block, 4, 1, (0, 2), (layer,), density=0.3, budget=0.35)


def _consumer(plan: SparsePlan, tensors: dict[str, torch.Tensor], group: int, q: torch.Tensor, k: torch.Tensor,
              v: torch.Tensor) -> torch.Tensor:  # fmt: skip
    """MindIE-SD's call: BNSD tensors flattened to TND, one length per sample."""
    batch, heads, tokens, dim = q.shape
    tnd = [x.transpose(1, 2).reshape(batch * tokens, heads, dim) for x in (q, k, v)]
    key = f"{plan.layers[0].layer}.group{group}"
    select, count = tensors[f"{key}.select_idx"], tensors[f"{key}.select_num_idx"]
    out, _ = rain_fusion_attention(tnd[0], tnd[1], tnd[2], select, count, [128, 128],
                                   actual_seq_qlen=[tokens] * batch, actual_seq_kvlen=[tokens] * batch,
                                   head_num=heads, scale=dim**-0.5)  # fmt: skip
    return out.view(batch, tokens, heads, dim).transpose(1, 2)


def _qkv(tokens: int) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(1)
    return tuple(torch.randn(2, HEADS, tokens, DIM, generator=gen) for _ in range(3))


@pytest.mark.parametrize("tokens", [320, 300])  # whole blocks, and a short last block
def test_plans_of_128_token_blocks_run_exactly_in_rain_fusion_attention(tokens: int) -> None:
    plan = _plan(128, tokens, {**GRID, "frames": 1, "height": 1, "width": tokens})
    config, tensors = mindiesd_sparse_export(plan)
    assert config["rain_fusion_attention"]["exact"] and config["masked_density_at_128"] == config["masked_density"]
    q, k, v = _qkv(tokens)
    for group in range(2):
        fine = torch.stack([plan.layers[0].mask(group, h, 128) for h in range(HEADS)])
        expected = sparse_attention_reference(q, k, v, BlockLayout.from_mask(fine, tokens, tokens, 128))
        got = _consumer(plan, tensors, group, q, k, v)
        assert torch.nn.functional.cosine_similarity(got.flatten(), expected.flatten(), dim=0) >= 0.9999


def test_finer_plans_are_coarsened_so_every_planned_pair_still_runs() -> None:
    tokens = 5 * 64
    plan = _plan(64, tokens, GRID)
    config, tensors = mindiesd_sparse_export(plan)
    assert not config["rain_fusion_attention"]["exact"]
    assert config["masked_density"] <= config["masked_density_at_128"] <= 1.0
    for group in range(2):
        select = tensors[f"blocks.0.attn1.group{group}.select_idx"]
        for h in range(HEADS):
            fine = plan.layers[0].mask(group, h, 64)
            for i, j in torch.nonzero(fine).tolist():  # planned fine block (i, j) lies in a kept coarse block
                assert j // 2 in select[i // 2, h].tolist()
    # What the consumer runs is the dense reference under the coarse token mask, built independently here.
    q, k, v = _qkv(tokens)
    select, count = tensors["blocks.0.attn1.group0.select_idx"], tensors["blocks.0.attn1.group0.select_num_idx"]
    token_mask = torch.zeros(HEADS, tokens, tokens, dtype=torch.bool)
    for i in range(select.shape[0]):
        for h in range(HEADS):
            for b in select[i, h, : int(count[i, h])].tolist():
                token_mask[h, i * 128 : (i + 1) * 128, b * 128 : (b + 1) * 128] = True
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=token_mask)
    got = _consumer(plan, tensors, 0, q, k, v)
    assert torch.nn.functional.cosine_similarity(got.flatten(), expected.flatten(), dim=0) >= 0.9999


def test_the_sparse_attention_arguments_follow_the_token_grid() -> None:
    config, _ = mindiesd_sparse_export(_plan(64, 320, GRID))
    entry = config["layers"][0]
    assert entry["sparse_attention"]["latent_shape_q"] == [5, 8, 8] and entry["sparse_attention"]["txt_len"] == 0
    assert entry["sparse_attention"]["sparse_type"] == "rf_v3" and len(entry["sparse_attention"]["sparsity"]) == 2
    assert not config["sparse_attention"]["exact"]  # rf_v3 picks its own blocks online
    trailing = mindiesd_sparse_export(_plan(64, 330, {**GRID, "suffix": 10}))[0]["layers"][0]
    assert trailing["sparse_attention"] is None and "text tokens first" in trailing["sparse_attention_not_expressible"]


def test_the_consumer_rejects_unpadded_rows() -> None:
    plan = _plan(128, 256, {**GRID, "frames": 1, "height": 1, "width": 256})
    _, tensors = mindiesd_sparse_export(plan)
    bad = dict(tensors)
    bad["blocks.0.attn1.group0.select_num_idx"] = tensors["blocks.0.attn1.group0.select_num_idx"] - 1
    bad["blocks.0.attn1.group0.select_num_idx"].clamp_(min=1)
    q, k, v = _qkv(256)
    assert bool((bad["blocks.0.attn1.group0.select_num_idx"] != tensors["blocks.0.attn1.group0.select_num_idx"]).any())
    with pytest.raises(ContractError, match="padding"):
        _consumer(plan, bad, 0, q, k, v)
