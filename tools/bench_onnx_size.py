"""ONNX file size of a full-size denoiser: diffkiln's W8A8 QDQ export against the FP16 export.

The denoiser is a full-size architecture with random weights (``diffkiln.zoo.architectures``),
rounded to float16 first, as released FP16 checkpoints are. Both files come from the same
exporter and passes: the FP16 one from the float16 module, the W8A8 one from diffkiln's runtime
modules (calibrated on random inputs at spread timesteps, float16 scales, what a bundle written
with ``--float-storage float16`` loads).

Usage:
    python tools/bench_onnx_size.py --model sd15-unet --latent 32 --work /tmp/onnx-size [--weight-bits 4]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
import warnings
from pathlib import Path
from typing import Any


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="sd15-unet", help="full-size architecture (default sd15-unet)")
    parser.add_argument("--latent", type=int, default=32, help="latent side of the traced call (default 32)")
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument(
        "--weight-bits", type=int, default=8, help="8, or 4 / 2 for every layer (INT4 initializers; default 8)"
    )
    args = parser.parse_args()
    warnings.filterwarnings("ignore")

    import torch

    import diffkiln.api as dk
    from diffkiln.core.plan import WeightSpec
    from diffkiln.export.onnx import OnnxExportConfig, export_module_onnx
    from diffkiln.zoo.architectures import build_full_denoiser, full_denoiser_inputs

    args.work.mkdir(parents=True, exist_ok=True)
    config = OnnxExportConfig(args.work, dynamic=False)
    model = build_full_denoiser(args.model).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.half().float())  # an FP16 checkpoint's values
    example = full_denoiser_inputs(args.model, 2, args.latent, 500.0, seed=0)
    results: dict[str, Any] = {"model": args.model, "latent": args.latent}

    t0 = time.perf_counter()
    half = {k: v.half() if v.is_floating_point() else v for k, v in example.items()}
    fp16_path = args.work / "denoiser-fp16.onnx"
    with torch.no_grad():
        export_module_onnx(model.half(), half, fp16_path, config)
    model.float()
    results["fp16_export_s"] = round(time.perf_counter() - t0, 1)

    timesteps = (999.0, 600.0, 300.0, 50.0)
    calls = [full_denoiser_inputs(args.model, 1, args.latent, t, seed=100 + i) for i, t in enumerate(timesteps)]
    stats = dk.calibrate(model, dk.CalibrationConfig(samples=1, samples_per_step=512), inputs=calls)
    plan = dk.make_plan(model, stats, dk.W8A8Config(scale_dtype="float16"), dk.SearchContext(source_id=args.model))
    if args.weight_bits != 8:  # every quantized layer at this width: a plan of that average
        spec = WeightSpec(args.weight_bits, scale_dtype="float16")
        plan = dataclasses.replace(
            plan, layers=tuple(dataclasses.replace(lp, weight=spec) if lp.quantized else lp for lp in plan.layers)
        )
    quantized = dk.quantize_(model, plan, stats)
    t0 = time.perf_counter()
    w8_path = args.work / f"denoiser-w{args.weight_bits}a8.onnx"
    with torch.no_grad():
        export_module_onnx(quantized, example, w8_path, config)
    results["quantized_export_s"] = round(time.perf_counter() - t0, 1)

    def size(path: Path) -> int:
        data = path.with_name(path.name + ".data")
        return path.stat().st_size + (data.stat().st_size if data.exists() else 0)

    results["fp16_mb"] = round(size(fp16_path) / 1e6, 1)
    results[f"w{args.weight_bits}a8_mb"] = round(size(w8_path) / 1e6, 1)
    results[f"w{args.weight_bits}a8_vs_fp16"] = round(size(w8_path) / size(fp16_path), 3)
    results["quantized_layers"] = sum(lp.quantized for lp in plan.layers)
    (args.work / f"results-w{args.weight_bits}.json").write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
