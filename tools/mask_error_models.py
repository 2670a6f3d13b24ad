"""How well error models built from calibrated block statistics rank sparse-attention masks.

The mask search scores a block mask by the calibrated errors of dropping its blocks one at a time
(``diffkiln.calibrate.attention_blocks``), added up. This tool draws random structured attention
(queries close to their keys, values drifting with position), computes the block statistics, and
compares, for random, banded and top-k masks at several densities, the exact error of the masked
attention output with each model's estimate:

* ``additive``: the sum of the one-block drop errors (what the search uses);
* ``renormalized``: the dropped blocks' probability-weighted output shifts, summed by the triangle
  inequality (the smaller of the dropped and the kept side, which are equal as vectors), over the
  mass left after dropping (the softmax renormalizes over the kept blocks);
* ``renormalized-rss``: the same with the shifts' root sum of squares (independent directions).

A model is useful to the search when it ranks masks as the exact error does (Spearman rank
correlation over the masks of one density).

Usage: python tools/mask_error_models.py [--tokens 512] [--block 32] [--masks 30]
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
import torch

from diffkiln.calibrate.attention_blocks import block_attention_stats

RESULTS = Path(__file__).parent / "results"


def _rank_correlation(a: np.ndarray, b: np.ndarray) -> float:
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ra, rb)[0, 1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--block", type=int, default=32)
    ap.add_argument("--masks", type=int, default=30, help="masks per density (random, banded, top-k in turn)")
    a = ap.parse_args()
    torch.manual_seed(0)
    n, dim, heads, blk = a.tokens, 32, 2, a.block
    nb = n // blk
    q = torch.randn(1, heads, n, dim)
    k = torch.randn(1, heads, n, dim) * 0.5 + q * 0.8  # queries attend to their own neighbourhood
    v = torch.randn(1, heads, n, dim) + (torch.arange(n) / n * 3.0)[None, None, :, None]
    mass, drop = block_attention_stats(q, k, v, blk)
    scores = q @ k.transpose(-1, -2) / math.sqrt(dim)
    full = torch.softmax(scores, -1) @ v
    shift = torch.where(torch.isinf(drop), torch.inf, drop * (1 - mass))  # m_j |o_j - out|

    def exact(mask: torch.Tensor) -> float:
        tok = mask.repeat_interleave(blk, 0).repeat_interleave(blk, 1)
        out = torch.softmax(scores.masked_fill(~tok, -torch.inf), -1) @ v
        return float((out - full).norm(dim=-1).mean())

    def renormalized(mask: torch.Tensor, rss: bool) -> float:
        s = shift * shift if rss else shift
        side = torch.minimum(torch.where(~mask, s, 0).sum(-1), torch.where(mask, s, 0).sum(-1))
        side = side.sqrt() if rss else side
        return float((side / (1 - torch.where(~mask, mass, 0).sum(-1)).clamp_min(1e-12)).mean())

    models = {
        "additive": lambda m: float(torch.where(~m, drop, 0).sum(-1).mean()),
        "renormalized": lambda m: renormalized(m, rss=False),
        "renormalized-rss": lambda m: renormalized(m, rss=True),
    }
    mean_mass = mass.mean(0)
    record: dict[str, dict[str, float]] = {}
    for density in (0.6, 0.35, 0.2, 0.1):
        truth, est = [], {name: [] for name in models}
        for s in range(a.masks):
            g = torch.Generator().manual_seed(s)
            i = torch.arange(nb)
            if s % 3 == 0:
                mask = torch.rand(nb, nb, generator=g) < density
            elif s % 3 == 1:
                width = int(density * nb / 2 * (0.5 + float(torch.rand(1, generator=g))))
                mask = (i[:, None] - i[None]).abs() <= width
            else:
                noisy = mean_mass + 0.05 * torch.rand(nb, nb, generator=g)
                mask = torch.zeros(nb, nb, dtype=torch.bool).scatter_(
                    1, noisy.topk(max(1, int(density * nb)), -1).indices, True
                )
            mask |= torch.eye(nb, dtype=torch.bool)
            truth.append(exact(mask))
            for name, fn in models.items():
                est[name].append(fn(mask))
        t = np.asarray(truth)
        record[str(density)] = {"exact_mean": round(float(t.mean()), 3)}
        for name, vals in est.items():
            record[str(density)][f"{name}_rank_corr"] = round(_rank_correlation(t, np.asarray(vals)), 3)
        print(density, record[str(density)])
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "mask_error_models.json").write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
