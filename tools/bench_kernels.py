"""Micro-benchmark of the CPU GEMM paths a W8A8 layer can take, side by side in one run.

For SD-like (M, K, N) shapes it times: fp32 GEMM, bf16 GEMM, torch._int_mm, diffkiln's exact int8
GEMM on fp32 units, and oneDNN's prepacked u8s8 GEMM (exact only on CPUs with VNNI/AMX; on AVX2 it
saturates for activations above 127). Prints a markdown table of median milliseconds and ratios
to fp32. Usage: python tools/bench_kernels.py [--repeat 10]
"""

# ruff: noqa: B023  (each lambda is timed at once, inside its own loop iteration)
from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from diffkiln.kernels.backends import cpu_has_vnni, int_mm_on_fp32_units

SHAPES = [(2 * 4096, 320, 320), (2 * 1024, 640, 1920), (2 * 256, 1280, 1280), (2 * 77, 768, 320)]


def _time(fn: Callable[[], object], repeat: int) -> float:
    fn()
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1000


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat", type=int, default=10)
    a = ap.parse_args()
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, VNNI/AMX: {cpu_has_vnni()}")
    print("| M x K x N | fp32 ms | bf16 | torch._int_mm | int8 on fp32 units | oneDNN u8s8 (prepacked) |")
    print("|---|---|---|---|---|---|")
    for m, k, n in SHAPES:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(m, k, generator=g)
        w = torch.randn(k, n, generator=g)
        xq = torch.randint(-128, 128, (m, k), dtype=torch.int8, generator=g)
        wq = torch.randint(-127, 128, (k, n), dtype=torch.int8, generator=g)
        xb, wb = x.bfloat16(), w.bfloat16()
        xu = (xq.to(torch.int16) + 128).to(torch.uint8)
        packed = torch.ops.onednn.qlinear_prepack(wq.t().contiguous(), None)
        ws, wz = torch.ones(n), torch.zeros(n, dtype=torch.int64)
        fp32 = _time(lambda: x @ w, a.repeat)
        row = [fp32]
        row.append(_time(lambda: xb @ wb, a.repeat))
        row.append(_time(lambda: torch._int_mm(xq, wq), max(2, a.repeat // 5)))
        row.append(_time(lambda: int_mm_on_fp32_units(xq, wq), a.repeat))
        row.append(
            _time(
                lambda: torch.ops.onednn.qlinear_pointwise(
                    xu, 1.0, 128, packed, ws, wz, None, 1.0, 0, torch.float32, "none", [None], ""
                ),
                a.repeat,
            )
        )
        cells = [f"{row[0]:.2f}"] + [f"{v:.2f} ({v / fp32:.2f}x)" for v in row[1:]]
        print(f"| {m}x{k}x{n} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
