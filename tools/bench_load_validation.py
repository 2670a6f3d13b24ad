"""What validating a bundle costs at load: the full-size SD1.5 UNet (random weights) as a W8A8
module bundle, loaded into a fresh model with ``load_into``, against the time of the checks alone.

The checks a hostile bundle needs (docs/bundle-security.md) are timed on the same data, in the same
process, interleaved with whole loads: the strict manifest schema (``validate_manifest``), the
folder walk (``check_tree``), the per-layer value rules against the model (``check_layers``), and
the finite check of every float tensor (``check_float_tensor``). The checksums (sha256 of every
file) were there before and are part of the load, not of the overhead. Reported: the median load,
the median of the checks, and checks / (load - checks): the cost of validation over a load
without it.

Usage: python tools/bench_load_validation.py [--repeat 3] [--latent 32]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

import diffkiln.api as dk
from diffkiln.core.confine import check_tree
from diffkiln.core.manifest_schema import validate_manifest
from diffkiln.nn.validate import check_float_tensor, check_layers
from diffkiln.zoo.architectures import build_full_denoiser, full_denoiser_inputs

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--latent", type=int, default=32)
    a = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="loadval-"))
    model = build_full_denoiser("sd15-unet")
    calls = [full_denoiser_inputs("sd15-unet", 2, a.latent, t, seed=i) for i, t in enumerate((900.0, 500.0))]
    stats = dk.calibrate(model, dk.CalibrationConfig(samples=1, samples_per_step=256), inputs=calls)
    plan = dk.make_plan(model, stats, dk.W8A8Config(), dk.SearchContext(source_id="sd15-unet"))
    bundle = dk.export_bundle(model, plan, stats, dk.ExportConfig(root / "b"))
    manifest = json.loads((bundle / "manifest.json").read_text())
    tensors = load_file(str(bundle / manifest["quant"]["weights_file"]))
    per_layer: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        layer, _, suffix = key.partition("::")
        if layer != "fp":
            per_layer.setdefault(layer, {})[suffix] = t
    metas = {n: info["meta"] for n, info in manifest["quant"]["layers"].items()}
    del model
    target = build_full_denoiser("sd15-unet", device="meta")  # layer types and shapes only
    loads, checks = [], []
    for _ in range(a.repeat):
        fresh = build_full_denoiser("sd15-unet", device="meta").to_empty(device="cpu")
        t0 = time.perf_counter()
        dk.load_into(fresh, bundle)
        loads.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        validate_manifest(manifest)
        check_tree(bundle, set(manifest["files"]), frozenset({"manifest.json"}))
        check_layers(target, per_layer, metas)
        for key, t in tensors.items():
            if key.startswith("fp::"):
                check_float_tensor(key, t)
        checks.append(time.perf_counter() - t0)
        del fresh
    load_s, check_s = statistics.median(loads), statistics.median(checks)
    record = {"model": "sd15-unet (full size, random weights), W8A8 module bundle",
              "bundle_mb": round(sum(f.stat().st_size for f in bundle.rglob("*") if f.is_file()) / 2**20, 1),
              "load_s": round(load_s, 3), "checks_s": round(check_s, 4),
              "overhead": round(check_s / max(load_s - check_s, 1e-9), 4), "threads": torch.get_num_threads(),
              "loads": [round(x, 3) for x in loads], "checks": [round(x, 4) for x in checks]}  # fmt: skip
    print(json.dumps(record, indent=2))
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "bench_load_validation.json").write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
