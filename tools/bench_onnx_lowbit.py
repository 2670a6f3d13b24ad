"""A mixed (4-/2-bit) bundle in onnxruntime: standard INT4/INT2 ONNX against MatMulNBits, side by side.

Exports the bundle three ways (``diffkiln export --format onnx``):

* ``int4``: opset 21, sub-byte codes as INT4 initializers into DequantizeLinear (standard ONNX);
* ``int2``: opset 25, 2-bit codes as INT2 (standard ONNX);
* ``matmulnbits``: opset 21 with ``--matmulnbits``: 4- and 2-bit Linear weights as onnxruntime's
  ``com.microsoft.MatMulNBits``.

For each: the denoiser file against the float denoiser's FP16 ONNX (same exporter and passes);
onnxruntime CPU latency of one denoiser call on the torch bundle's recorded inputs (graph
optimizations on; calls interleaved across variants, median of ``--repeat`` rounds); per-call
output SQNR against the torch bundle on the same inputs (min / median); and end-to-end final
latents of ``load(DIR, backend="onnxruntime")`` against the torch bundle over ``--prompts``
prompts (pooled SQNR, same seeds). The torch bundle's own call time is reported beside them.

Usage:
    python tools/bench_onnx_lowbit.py --bundle B --work DIR [--prompts 4] [--repeat 20]
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
import warnings
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]

VARIANTS = {
    "int4": {"opset": 21, "matmulnbits": False},
    "int2": {"opset": 25, "matmulnbits": False},
    "matmulnbits": {"opset": 21, "matmulnbits": True},
}


def _call_kwargs(manifest: dict[str, Any]) -> dict[str, Any]:
    """The pipeline-call arguments the bundle was calibrated with."""
    return dict(manifest.get("plan", {}).get("notes", {}).get("calibration", {}).get("call_kwargs", {}))


def _fp16_onnx(bundle: Path, call: dict[str, Any], work: Path) -> Path:
    """The float source model's denoiser as FP16 ONNX, through diffkiln's exporter."""
    import torch

    from diffkiln.core.schema import read_json
    from diffkiln.export.onnx import OnnxExportConfig, export_module_onnx
    from diffkiln.generation import load_pipeline
    from diffkiln.zoo.registry import resolve_target

    manifest = read_json(bundle / "manifest.json")
    pipe = load_pipeline(resolve_target(manifest["source"]["id"]))
    module = copy.deepcopy(getattr(pipe, manifest["pipeline"]["denoiser"])).half()
    call = {k: v.half() if isinstance(v, torch.Tensor) and v.is_floating_point() else v for k, v in call.items()}
    path = work / "denoiser-fp16.onnx"
    with torch.no_grad():
        export_module_onnx(module, call, path, OnnxExportConfig(work), float16=True)
    return path


def _latents(pipe: Any, prompts: list[str], call_kwargs: dict[str, Any]) -> Any:
    import torch

    pipe.set_progress_bar_config(disable=True)
    out = []
    for i, p in enumerate(prompts):
        g = torch.Generator().manual_seed(1000 + i)
        with torch.no_grad():
            out.append(pipe(p, output_type="latent", generator=g, **call_kwargs).images)
    return torch.cat(out)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", type=Path, required=True, help="a mixed-precision bundle")
    parser.add_argument("--work", type=Path, required=True, help="scratch and results folder")
    parser.add_argument("--prompts", type=int, default=4, help="end-to-end prompts (default 4)")
    parser.add_argument("--repeat", type=int, default=20, help="timed rounds over the recorded calls (default 20)")
    parser.add_argument("--out", type=Path, default=None, help="results JSON (default WORK/results.json)")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")

    import numpy as np
    import torch

    from diffkiln.api import convert
    from diffkiln.calibrate.dataflow import bind_call
    from diffkiln.core.hooks import recording_calls
    from diffkiln.core.metrics import sqnr_db
    from diffkiln.core.schema import read_json
    from diffkiln.export.onnx import OnnxExportConfig
    from diffkiln.runtime import load
    from diffkiln.zoo.registry import get_builtin

    args.work.mkdir(parents=True, exist_ok=True)
    manifest = read_json(args.bundle / "manifest.json")
    call_kwargs = _call_kwargs(manifest)
    prompts = (get_builtin("shapes-unet").calibration_prompts(64 + args.prompts) or [])[64:]
    torch_pipe = load(args.bundle, device="cpu")
    name = manifest["pipeline"]["denoiser"]
    torch_pipe.set_progress_bar_config(disable=True)
    with recording_calls("bench.lowbit", getattr(torch_pipe, name)) as calls, torch.no_grad():
        torch_pipe(prompts[0], output_type="latent", generator=torch.Generator().manual_seed(0), **call_kwargs)
    calls = [(a, {**kw, "return_dict": False}) for a, kw in calls]
    torch_denoiser = getattr(torch_pipe, name)
    with torch.no_grad():
        torch_out = [torch_denoiser(*a, **kw)[0] for a, kw in calls]

    fp16 = _fp16_onnx(args.bundle, bind_call(torch_denoiser, *calls[0]), args.work)
    results: dict[str, Any] = {
        "bundle": str(args.bundle),
        "source": manifest["source"]["id"],
        "threads": torch.get_num_threads(),
        "denoiser_calls": len(calls),
        "prompts": len(prompts),
        "fp16_onnx_mb": round(fp16.stat().st_size / 1e6, 3),
        "variants": {},
    }
    reference = _latents(torch_pipe, prompts, call_kwargs)
    runners: dict[str, Any] = {"torch_bundle": torch_denoiser}
    for variant, opts in VARIANTS.items():
        folder = args.work / f"onnx-{variant}"
        convert(args.bundle, OnnxExportConfig(folder, overwrite=True, progress=False, **opts))  # type: ignore[arg-type]
        file = folder / "denoiser.onnx"
        ort_pipe = load(folder, backend="onnxruntime", ort_optimize=True)
        denoiser = getattr(ort_pipe, name)
        with torch.no_grad():
            outs = [denoiser(*a, **kw)[0] for a, kw in calls]
        per_call = [sqnr_db(t.numpy(), o.numpy()) for t, o in zip(torch_out, outs, strict=True)]
        latents = _latents(ort_pipe, prompts, call_kwargs)
        results["variants"][variant] = {
            **opts,
            "denoiser_mb": round(file.stat().st_size / 1e6, 3),
            "size_vs_fp16": round(file.stat().st_size / fp16.stat().st_size, 3),
            "per_call_sqnr_vs_torch_db": {
                "min": round(min(per_call), 2),
                "median": round(statistics.median(per_call), 2),
            },
            "latent_sqnr_vs_torch_db": round(sqnr_db(reference.numpy(), latents.numpy()), 2),
        }
        runners[variant] = denoiser
        print(variant, results["variants"][variant], flush=True)
    times: dict[str, list[float]] = {k: [] for k in runners}
    picked = calls[:: max(1, len(calls) // 4)][:4]  # a few timesteps of the sampler
    with torch.no_grad():
        for module in runners.values():
            module(*picked[0][0], **picked[0][1])  # warm-up
        for _ in range(args.repeat):
            for key, module in runners.items():
                t0 = time.perf_counter()
                for a, kw in picked:
                    module(*a, **kw)
                times[key].append((time.perf_counter() - t0) * 1e3 / len(picked))
    results["ms_per_call"] = {k: round(statistics.median(v), 3) for k, v in times.items()}
    results["ms_per_call_iqr"] = {k: [round(float(q), 3) for q in np.percentile(v, [25, 75])] for k, v in times.items()}
    out = args.out or args.work / "results.json"
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
