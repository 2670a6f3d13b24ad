"""Block attention statistics against brute force: each block's mass from the probabilities, and
the error of dropping it from SDPA run with that block masked out."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from diffkiln.calibrate.attention_blocks import block_attention_stats


@pytest.mark.parametrize(("q_len", "kv_len", "block"), [(64, 64, 16), (50, 70, 16), (33, 33, 64)])
def test_mass_and_drop_error_match_brute_force(q_len: int, kv_len: int, block: int) -> None:
    g = torch.Generator().manual_seed(q_len)
    q = torch.randn(2, 3, q_len, 8, generator=g)
    k = torch.randn(2, 3, kv_len, 8, generator=g)
    v = torch.randn(2, 3, kv_len, 5, generator=g)
    mass, error = block_attention_stats(q, k, v, block)
    qb, kb = -(-q_len // block), -(-kv_len // block)
    assert mass.shape == error.shape == (3, qb, kb)
    assert torch.allclose(mass.sum(-1), torch.ones(3, qb), atol=1e-5)
    p = torch.softmax(q @ k.transpose(-1, -2) / 8**0.5, dim=-1)
    full = F.scaled_dot_product_attention(q, k, v)
    for j in range(kb):
        keep = torch.ones(kv_len, dtype=torch.bool)
        keep[j * block : (j + 1) * block] = False
        if not keep.any():  # the only key block: dropping it leaves no softmax at all
            assert torch.isinf(error[:, :, j]).all()
            continue
        dropped = F.scaled_dot_product_attention(q, k, v, attn_mask=keep.expand(q_len, kv_len))
        per_query = (dropped - full).norm(dim=-1)  # (batch, heads, q_len)
        block_mass = p[..., ~keep].sum(-1)
        for i in range(qb):
            rows = slice(i * block, (i + 1) * block)
            assert error[:, i, j] == pytest.approx(per_query[..., rows].mean(dim=(0, 2)), rel=1e-3, abs=1e-5)
            assert mass[:, i, j] == pytest.approx(block_mass[..., rows].mean(dim=(0, 2)), rel=1e-4, abs=1e-6)
