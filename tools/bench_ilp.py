"""Time the ILP bit allocation on a model-sized instance (issue target: 1,000 layers x 4 candidates < 2 s).

Usage:
    python tools/bench_ilp.py --layers 1000 --repeat 3
"""

from __future__ import annotations

import argparse
import random
import time

from diffkiln.optimizer.allocation import LayerOptions, allocate_bits


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=1000, help="layers (default 1000)")
    ap.add_argument("--candidates", default="2,4,8,16", help="candidate bit-widths (default 2,4,8,16)")
    ap.add_argument("--avg-bits", type=float, default=4.0, help="budget (default 4.0)")
    ap.add_argument("--repeat", type=int, default=3, help="timed solves (default 3)")
    a = ap.parse_args()
    cands = [int(c) for c in a.candidates.split(",")]
    rng = random.Random(0)
    layers = []
    for i in range(a.layers):
        sens = rng.lognormvariate(0.0, 1.5)
        layers.append(LayerOptions(f"l{i}", rng.randint(1_000, 5_000_000), {b: -sens / b**2 for b in cands}))
    times = []
    for _ in range(a.repeat):
        t = time.perf_counter()
        choice = allocate_bits(layers, a.avg_bits)
        times.append(time.perf_counter() - t)
    total = sum(lo.params for lo in layers)
    avg = sum(lo.params * choice[lo.name] for lo in layers) / total
    print(
        f"{a.layers} layers x {len(cands)} candidates, budget {a.avg_bits} bits: solved in "
        f"{sorted(times)[len(times) // 2]:.2f} s (median of {a.repeat}); achieved average {avg:.3f} bits"
    )


if __name__ == "__main__":
    main()
