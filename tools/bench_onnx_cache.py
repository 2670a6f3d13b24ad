"""Cache schedules on onnxruntime: the exported graph pair against the uncached export, side by side.

For each model and mechanism: builds ``diffkiln optimize MODEL --recipe w8a8`` with a cache schedule
of that mechanism at ``--budget`` (``--steps`` steps), exports it to ONNX, and runs the evaluation
prompts (two judged sets, seeds 0..n-1) four ways in one process: the torch bundle with and without
its schedule, and the ONNX folder on onnxruntime's CPU provider with and without it. Reported per
way: the denoiser's time over the sampling loop (sum of its calls, per prompt), content
accuracy, and latent SQNR of each onnxruntime run against the torch run on the same schedule.

Usage: python tools/bench_onnx_cache.py --work /tmp/bench-onnx-cache [--eval-size 10]
[--cases shapes-dit:residual shapes-unet:deep shapes-dit:whole]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from diffkiln.api import CacheConfig, OptimizeConfig, W8A8Config, convert, optimize
from diffkiln.core.cache_schedule import CacheSchedule
from diffkiln.core.metrics import sqnr_db
from diffkiln.export.onnx import OnnxExportConfig
from diffkiln.generation import GenerateConfig, generate
from diffkiln.report.evaluate import ReportConfig
from diffkiln.report.judging import judge_all, prompt_list, quality
from diffkiln.runtime import load
from diffkiln.zoo.registry import resolve_target

ROOT = Path(__file__).resolve().parents[1]


def _run(pipe: Any, prompts: list[str], model: str, steps: int) -> dict[str, Any]:
    target = resolve_target(model)
    # One prompt per call, so the denoiser's loop time is per sample (sample i is seeded i).
    r = generate(pipe, prompts, GenerateConfig(steps=steps, batch_size=1, progress=False), target, measure=True)
    q = quality(judge_all(r, target.builtin.judge)) if target.builtin else {}
    return {"loop_ms": r.extras["denoiser_loop_ms"] / len(prompts), "latents": r.extras["latents"], "quality": q}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--cases", nargs="+", default=["shapes-dit:residual", "shapes-unet:deep", "shapes-dit:whole"])
    ap.add_argument("--budget", type=float, default=0.5)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--eval-size", type=int, default=10, help="prompts per set (single, pairs)")
    a = ap.parse_args()
    rows = []
    for case in a.cases:
        model, mechanism = case.split(":")
        work = a.work / f"{model}-{mechanism}"
        bundle = work / "bundle"
        if not (bundle / "manifest.json").is_file():
            cache = CacheConfig(budget=a.budget, mechanisms=(mechanism,))
            optimize(model, OptimizeConfig(out=bundle, recipe=W8A8Config(), cache=cache, steps=a.steps, progress=False,
                                           overwrite=True))  # fmt: skip
        folder = work / "onnx"
        if not (folder / "manifest.json").is_file():
            convert(bundle, OnnxExportConfig(folder, progress=False, overwrite=True))
        sets = prompt_list(ReportConfig(eval_size=a.eval_size), resolve_target(model).builtin.judge)
        prompts = sets[: a.eval_size] + sets[-a.eval_size :]  # single (seen) and pairs
        ways = {
            "torch cached": load(bundle, "cpu"),
            "torch uncached": load(bundle, "cpu", cache=False),
            "onnxruntime cached": load(folder, "cpu", backend="onnxruntime"),
            "onnxruntime uncached": load(folder, "cpu", backend="onnxruntime", cache=False),
        }
        out = {name: _run(pipe, prompts, model, a.steps) for name, pipe in ways.items()}
        schedule = CacheSchedule.from_dict(json.loads((bundle / "manifest.json").read_text())["cache"])
        for name, r in out.items():
            backend, way = name.split()
            rows.append({
                "model": model, "mechanism": mechanism, "way": name,
                "compute_fraction": round(schedule.compute_fraction, 3) if way == "cached" else 1.0,
                "loop_ms": round(r["loop_ms"], 1),
                "loop_vs_uncached": round(r["loop_ms"] / out[f"{backend} uncached"]["loop_ms"], 3),
                "content_single": r["quality"].get("content_accuracy"),
                "content_pairs": r["quality"].get("content_accuracy_pairs"),
                "sqnr_vs_torch_db": None if backend == "torch" else round(float(sqnr_db(
                    out[f"torch {way}"]["latents"].numpy(), r["latents"].numpy())), 1),
            })  # fmt: skip
    results = ROOT / "tools" / "results" / "bench_onnx_cache.json"
    results.parent.mkdir(parents=True, exist_ok=True)
    results.write_text(json.dumps(rows, indent=2) + "\n")
    keys = list(rows[0])
    print("| " + " | ".join(keys) + " |\n|" + "---|" * len(keys))
    for row in rows:
        print("| " + " | ".join(str(row[k]) for k in keys) + " |")


if __name__ == "__main__":
    main()
