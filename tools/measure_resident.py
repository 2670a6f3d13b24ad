"""Resident denoiser memory of bundles at run time, against the FP16 denoiser's bytes.

Loads each bundle, runs one short generation (so backend caches are built), and counts every
tensor the denoiser keeps (diffkiln.runtime.memory.resident_bytes).

Usage:
    python tools/measure_resident.py BUNDLE [BUNDLE ...]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

import diffkiln.runtime as rt
from diffkiln.core.pipelines import find_denoiser
from diffkiln.runtime.inspect import denoiser_sizes
from diffkiln.runtime.memory import resident_bytes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("bundles", nargs="+", type=Path, help="bundle directories")
    a = ap.parse_args()
    print("| bundle | avg W bits | stored / FP16 | resident / FP16 | resident bytes |")
    print("|---|---|---|---|---|")
    for path in a.bundles:
        pipe = rt.load(path, device="cpu")
        pipe.set_progress_bar_config(disable=True)
        pipe(["a red circle at the top"], num_inference_steps=2, generator=torch.Generator().manual_seed(0))
        manifest = pipe.diffkiln_manifest
        stored, fp16 = denoiser_sizes(path, manifest)
        resident = resident_bytes(find_denoiser(pipe))
        bits = manifest["quant"]["avg_weight_bits"]
        print(f"| {path} | {bits:.2f} | {stored / fp16:.3f} | {resident / fp16:.3f} | {resident:,} |")


if __name__ == "__main__":
    main()
