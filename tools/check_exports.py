"""Export every tiny zoo architecture's W8A8 bundle to ONNX and MindIE-SD, and check each export
against the torch runtime.

For each architecture: calibrate (4 prompts, 4 steps), plan W8A8 static, write the bundle, then

* ``export --format onnx`` (all components, dynamic axes where the model allows): records the
  export time, each component's dynamic axes, the ONNX sizes, and the latent SQNR of the
  onnxruntime pipeline against the torch bundle (same prompt and seed, ``--steps`` steps) plus
  the denoiser's per-call SQNR on the torch run's recorded inputs;
* ``export --format mindiesd``: records whether it wrote, and what it widened.

Usage:
    python tools/check_exports.py [--models tiny-sd15,tiny-sd3] [--steps 4] [--work /tmp/exports]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def _check(name: str, work: Path, steps: int) -> dict[str, Any]:
    import torch

    from diffkiln.api import convert
    from diffkiln.calibrate import CalibrationConfig, calibrate
    from diffkiln.core.hooks import recording_calls
    from diffkiln.core.metrics import sqnr_db
    from diffkiln.export import ExportConfig, export_bundle
    from diffkiln.export.mindiesd import MindieExportConfig
    from diffkiln.export.onnx import OnnxExportConfig
    from diffkiln.optimizer import SearchContext, W8A8Config, make_plan
    from diffkiln.runtime import load
    from diffkiln.zoo.architectures import build_tiny_pipeline
    from diffkiln.zoo.catalog import TINY_CATALOG

    call_kwargs = dict(next(e for e in TINY_CATALOG if e.name == name).call_kwargs)
    pipe = build_tiny_pipeline(name, work / "scratch")
    prompts = ("a red circle on the left", "a blue square above a green triangle", "a yellow circle", "a cat")
    stats = calibrate(
        pipe,
        CalibrationConfig(
            prompts,
            steps=4,
            batch_size=4,
            cache_dir=work / "cache",
            progress=False,
            call_kwargs=tuple(call_kwargs.items()),
        ),
    )
    plan = make_plan(pipe, stats, W8A8Config(), SearchContext(source_id=name))
    bundle = export_bundle(pipe, plan, stats, ExportConfig(work / "bundle", overwrite=True))
    row: dict[str, Any] = {"model": name}
    t0 = time.perf_counter()
    out = convert(bundle, OnnxExportConfig(work / "onnx", overwrite=True))
    row["onnx_export_s"] = round(time.perf_counter() - t0, 1)
    manifest = json.loads((out / "manifest.json").read_text())
    row["components"] = {
        k: {"dynamic_axes": {n: a for n, a in v["dynamic_axes"].items() if a},
            "mb": round((out / v["file"]).stat().st_size / 1e6, 3)}
        for k, v in manifest["components"].items()
    }  # fmt: skip
    torch_pipe = load(bundle, "cpu")
    ort_pipe = load(out, "cpu", backend="onnxruntime")
    denoiser = manifest["pipeline"]["denoiser"]
    results = []
    for p in (torch_pipe, ort_pipe):
        p.set_progress_bar_config(disable=True)
        with recording_calls("check", getattr(torch_pipe, denoiser)) as calls:
            result = p("a red circle on the left", num_inference_steps=steps, output_type="latent",
                       generator=torch.Generator().manual_seed(0), **call_kwargs)  # fmt: skip
        results.append((getattr(result, "images", None) if hasattr(result, "images") else result.frames, calls))
    (ref, calls), (got, _) = results
    row["latent_sqnr_db"] = round(sqnr_db(ref.numpy(), got.numpy()), 1)
    per_call = []
    for args, kwargs in calls:
        with torch.no_grad():
            a = getattr(torch_pipe, denoiser)(*args, **kwargs)[0]
            b = getattr(ort_pipe, denoiser)(*args, **kwargs)[0]
        per_call.append(sqnr_db(a.numpy(), b.numpy()))
    row["denoiser_call_sqnr_db_min"] = round(min(per_call), 1)
    md = convert(bundle, MindieExportConfig(work / "mindiesd", overwrite=True))
    meta = json.loads((md / "diffkiln_export.json").read_text())
    row["mindiesd"] = {
        "model_quant_type": meta["model_quant_type"],
        "quantized_on_target": len(meta["quantized_on_target"]),
        "float_on_target": len(meta["float_on_target"]),
        "widened": len(meta["widened"]),
        "bos_rows_not_applied": len(meta["bos_rows_not_applied"]),
    }
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="tiny-sd15,tiny-sdxl,tiny-sd3,tiny-flux,tiny-pixart,tiny-wan")
    parser.add_argument("--steps", type=int, default=4, help="sampler steps of the compared runs (default 4)")
    parser.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temporary one)")
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="diffkiln-exports-"))
    rows = []
    for name in args.models.split(","):
        try:
            row = _check(name, work / name, args.steps)
        except Exception as exc:  # one architecture's failure is a result, not the end of the run
            row = {"model": name, "error": f"{type(exc).__name__}: {str(exc)[:400]}"}
            traceback.print_exc()
        print(json.dumps(row), flush=True)
        rows.append(row)
    (work / "results.json").write_text(json.dumps(rows, indent=2))
    print(f"results: {work / 'results.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
