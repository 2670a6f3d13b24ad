"""Cache schedules against the cache methods users pick by hand, at the same measured compute.

For each model and step count: the FP pipeline on the evaluation prompts (three judged sets, seeds
0..n-1) is the reference. Every method then runs on the same prompts and seeds, and is measured:
the compute fraction (block evaluations that ran over the uncached denoiser's, counted by a hook
inside every block, under the method's own hooks), content accuracy per set, latent SQNR against
FP, and the denoiser's ms per call, side by side in one process.

Methods, at each budget:

* ``diffkiln``: the schedule ``diffkiln optimize MODEL --recipe cache --cache-budget B`` searches;
* ``uniform interval``: the whole denoiser output reused on evenly spaced steps (FORA-style);
* ``DeepCache interval`` (models with a deep branch): the deep blocks reused on evenly spaced steps;
* diffusers ``FirstBlockCacheConfig`` and ``MagCacheConfig`` (calibrated with its own
  ``calibrate=True``), thresholds bisected until the measured compute matches; and
  ``TaylorSeerCacheConfig`` (lite mode), its interval chosen to match. Where diffusers cannot apply
  one to a model, the row says why.

``--w8a8`` adds W8A8 + cache at 0.5 against W8A8 alone, FP32 and FP in bfloat16. Results go to
``tools/results/bench_cache_<model>_<steps>.json``; the table is printed as markdown.

Usage: python tools/bench_cache.py --models shapes-dit shapes-unet --steps 20 [--budgets 0.35,0.5]
[--eval-size 50] [--w8a8] [--schedules CCCrCrCr...,...]

Each row also counts, per prompt, the misses only it has and those only the uniform interval has,
with the exact sign test's p: content accuracies a few prompts apart are often chance.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import re
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from diffusers.hooks import (
    FirstBlockCacheConfig,
    HookRegistry,
    MagCacheConfig,
    ModelHook,
    TaylorSeerCacheConfig,
    apply_first_block_cache,
    apply_mag_cache,
    apply_taylorseer_cache,
)
from diffusers.models.cache_utils import CacheMixin

from diffkiln.api import CacheConfig, OptimizeConfig, W8A8Config, optimize
from diffkiln.core.cache_schedule import CacheMechanism, CacheSchedule
from diffkiln.generation import GenerateConfig, generate, load_pipeline
from diffkiln.nn.cache import cache_schedule_applied
from diffkiln.optimizer.cache_search import full_steps_allowed, uniform_schedule
from diffkiln.report.compare import fidelity
from diffkiln.report.evaluate import ReportConfig, judge_all, prompt_list, quality
from diffkiln.runtime import load
from diffkiln.zoo.registry import resolve_target

RESULTS = Path(__file__).parent / "results"


class _Count(ModelHook):
    """Counts a block's real evaluations; registered first, so every cache's hook wraps it."""

    def __init__(self, counter: list[int]) -> None:
        super().__init__()
        self.counter = counter

    def pre_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> tuple[Any, Any]:
        self.counter[0] += 1
        return args, kwargs


def _counted(pipe: Any, blocks: tuple[str, ...]) -> tuple[Any, list[int]]:
    """Count ``pipe``'s denoiser calls (counter[1]) and its blocks' real evaluations (counter[0])."""
    pipe.set_progress_bar_config(disable=True)
    denoiser = getattr(pipe, "unet", None) or pipe.transformer
    counter = [0, 0]

    def call(_m: Any, _a: Any) -> None:
        counter[1] += 1

    denoiser.register_forward_pre_hook(call)
    for name in blocks:
        HookRegistry.check_if_exists_or_initialize(denoiser.get_submodule(name)).register_hook(
            _Count(counter), "bench.count"
        )
    return denoiser, counter


def _fresh(model: str, blocks: tuple[str, ...]) -> tuple[Any, Any, list[int]]:
    """A fresh FP pipeline with counting hooks: (pipe, denoiser, counter)."""
    pipe = load_pipeline(model)
    denoiser, counter = _counted(pipe, blocks)
    return pipe, denoiser, counter


def _measure(model: str, pipe: Any, counter: list[int], prompts: list[str], steps: int, fp: Any, n_blocks: int,
             context: Callable[[], Any] | None = None) -> dict[str, Any]:  # fmt: skip
    """Run the evaluation and measure it against FP."""
    counter[0] = counter[1] = 0
    resolved = resolve_target(model)
    with context() if context else contextlib.nullcontext():
        result = generate(pipe, prompts, GenerateConfig(steps=steps, progress=False), resolved, measure=True)
    judged = judge_all(result, resolved.builtin.judge)
    q = quality(judged)
    return {
        "compute_fraction": round(counter[0] / max(counter[1] * n_blocks, 1), 4),
        "content_accuracy": [q["content_accuracy"], q["content_accuracy_heldout"], q["content_accuracy_pairs"]],
        "latent_sqnr_db": round(fidelity(fp, result)["latent_sqnr_db"], 2) if fp is not None else None,
        "ms_per_call": round(result.extras["denoiser_ms_per_step"], 2),
        "denoiser_loop_ms": round(result.extras["denoiser_loop_ms"], 1),
        "denoiser_calls": counter[1],
        "missed": [i for i, j in enumerate(judged) if j.correct is False],
    }


def sign_test(only_here: int, only_there: int) -> float:
    """Two-sided exact sign test (McNemar's exact test) on paired judged outcomes: the chance of
    a split at least this uneven when both methods miss equally often."""
    n = only_here + only_there
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, k) for k in range(min(only_here, only_there) + 1)) / 2**n
    return min(1.0, 2 * tail)


def _context(denoiser: Any) -> Callable[[], Any]:
    """diffusers' cache hooks need a cache context; pipelines without CacheMixin never set one."""
    return lambda: CacheMixin.cache_context(denoiser, "cond")


def _bisect(run: Callable[[float], float], target: float, lo: float, hi: float, iters: int = 7) -> float:
    """The threshold whose measured compute is nearest ``target`` (compute falls as it rises)."""
    best, best_gap = lo, float("inf")
    for _ in range(iters):
        mid = (lo + hi) / 2
        frac = run(mid)
        if abs(frac - target) < best_gap:
            best, best_gap = mid, abs(frac - target)
        if frac > target:
            lo = mid
        else:
            hi = mid
    return best


def _baselines(model: str, schedule: CacheSchedule, budget: float, prompts: list[str], tune: list[str], steps: int,
               fp: Any, extra: tuple[str, ...] = ()) -> dict[str, Any]:  # fmt: skip
    blocks = schedule.blocks
    n = len(blocks)
    rows: dict[str, Any] = {}

    def ours(s: CacheSchedule, label: str) -> None:
        pipe, den, counter = _fresh(model, blocks)
        with cache_schedule_applied(den, s, pipe.scheduler):
            rows[label] = _measure(model, pipe, counter, prompts, steps, fp, n)

    ours(schedule, "diffkiln")
    k = full_steps_allowed(steps, n, n, budget)
    ours(CacheSchedule(CacheMechanism.WHOLE, blocks, 0, n, uniform_schedule(steps, k), schedule.calls_per_step),
         "uniform interval")  # fmt: skip
    for pattern in extra:  # hand-written whole-output schedules of this step count and budget
        compute = tuple(c == "C" for c in pattern)
        if len(compute) == steps and sum(compute) == k:
            ours(CacheSchedule(CacheMechanism.WHOLE, blocks, 0, n, compute, schedule.calls_per_step), f"`{pattern}`")
        else:
            print(f"skipped {pattern}: not {steps} steps with {k} computing (budget {budget})")
    if n >= 3:
        d = 1
        kd = full_steps_allowed(steps, n, n - 2 * d, budget)
        if kd >= 1:
            deep = CacheSchedule(CacheMechanism.DEEP, blocks, d, n - d, uniform_schedule(steps, kd),
                                 schedule.calls_per_step)  # fmt: skip
            ours(deep, "DeepCache interval")

    def diffusers_method(label: str, apply: Callable[[Any, float], None], lo: float, hi: float) -> None:
        def run(threshold: float, eval_prompts: list[str]) -> dict[str, Any]:
            pipe, den, counter = _fresh(model, blocks)
            apply(den, threshold)
            return _measure(
                model, pipe, counter, eval_prompts, steps, None if eval_prompts is tune else fp, n, _context(den)
            )

        try:
            threshold = _bisect(lambda t: run(t, tune)["compute_fraction"], budget, lo, hi)
            rows[label] = {**run(threshold, prompts), "threshold": round(threshold, 5)}
        except Exception as exc:  # a diffusers cache that does not apply to this model
            rows[label] = {"not_applicable": f"{type(exc).__name__}: {str(exc)[:160]}"}

    diffusers_method("diffusers FirstBlockCache", lambda d, t: apply_first_block_cache(d, FirstBlockCacheConfig(t)),
                     0.0, 2.0)  # fmt: skip
    ratios = _mag_ratios(model, blocks, tune, steps)
    if isinstance(ratios, str):
        rows["diffusers MagCache"] = {"not_applicable": ratios}
    else:
        diffusers_method("diffusers MagCache", lambda d, t: apply_mag_cache(d, MagCacheConfig(
            threshold=t, num_inference_steps=steps, mag_ratios=ratios, max_skip_steps=steps)), 0.0, 4.0)  # fmt: skip
    rows.update(_taylorseer(model, blocks, budget, prompts, tune, steps, fp))
    return rows


_ATTENTION = r".*attn\d*"


def _taylorseer(model: str, blocks: tuple[str, ...], budget: float, prompts: list[str], tune: list[str], steps: int,
                fp: Any) -> dict[str, Any]:  # fmt: skip
    """TaylorSeer: lite mode (blocks skipped, the output projection predicted; compute counted over
    blocks) where diffusers can apply it, else the default mode on the attention modules (compute
    counted over attention modules). Its cache interval is chosen to match the budget."""
    for label, lite in (("diffusers TaylorSeer (lite)", True), ("diffusers TaylorSeer (attention)", False)):

        def run(interval: int, eval_prompts: list[str], reference: Any, lite: bool = lite) -> dict[str, Any]:
            pipe = load_pipeline(model)
            den = getattr(pipe, "unet", None) or pipe.transformer
            counted = blocks if lite else tuple(n for n, _ in den.named_modules() if re.fullmatch(_ATTENTION, n))
            _, counter = _counted(pipe, counted)
            config = TaylorSeerCacheConfig(cache_interval=interval, disable_cache_before_step=2, use_lite_mode=lite,
                                           taylor_factors_dtype=torch.float32,
                                           cache_identifiers=None if lite else [_ATTENTION])  # fmt: skip
            apply_taylorseer_cache(den, config)
            return _measure(model, pipe, counter, eval_prompts, steps, reference, len(counted), _context(den))

        try:
            tuned = min(range(2, 9), key=lambda k: abs(run(k, tune, None)["compute_fraction"] - budget))
            return {label: {**run(tuned, prompts, fp), "cache_interval": tuned,
                            "counted_over": "blocks" if lite else "attention modules"}}  # fmt: skip
        except Exception as exc:
            failure = f"{type(exc).__name__}: {str(exc)[:120]}"
            if not lite:
                return {label: {"not_applicable": failure}}
    return {}


def _mag_ratios(model: str, blocks: tuple[str, ...], prompts: list[str], steps: int) -> list[float] | str:
    """MagCache's own calibration (``calibrate=True``): the ratios it prints at the end of a run."""
    try:
        pipe, den, counter = _fresh(model, blocks)
        apply_mag_cache(den, MagCacheConfig(num_inference_steps=steps, calibrate=True))
        text = io.StringIO()
        with contextlib.redirect_stdout(text):
            _measure(model, pipe, counter, prompts[:4], steps, None, len(blocks), _context(den))
        found = re.findall(r"\[([-0-9.e, ]+)\]", text.getvalue())
        return [float(v) for v in found[-1].split(",")] if found else "MagCache printed no calibration ratios"
    except Exception as exc:
        return f"{type(exc).__name__}: {str(exc)[:160]}"


def _w8a8(model: str, steps: int, prompts: list[str], fp: Any, root: Path, calib: int) -> dict[str, Any]:
    config = OptimizeConfig(out=root / "w8a8-cache", recipe=W8A8Config(), steps=steps, calib_size=calib,
                            cache=CacheConfig(budget=0.5), progress=False)  # fmt: skip
    bundle = optimize(model, config)
    out: dict[str, Any] = {}
    blocks = CacheSchedule.from_dict(json.loads((bundle / "manifest.json").read_text())["cache"]).blocks
    for label, pipe in (("W8A8 + cache 0.5", load(bundle, "cpu")), ("W8A8", load(bundle, "cpu", cache=False))):
        _, counter = _counted(pipe, blocks)
        out[label] = _measure(model, pipe, counter, prompts, steps, fp, len(blocks))
    pipe = load_pipeline(model).to(torch.bfloat16)
    _, counter = _counted(pipe, blocks)
    out["FP bfloat16"] = _measure(model, pipe, counter, prompts, steps, fp, len(blocks))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["shapes-dit", "shapes-unet"])
    ap.add_argument("--steps", type=int, nargs="+", default=[20])
    ap.add_argument("--budgets", default="0.35,0.5")
    ap.add_argument("--eval-size", type=int, default=50)
    ap.add_argument("--tune-size", type=int, default=4, help="prompts per set used to tune thresholds")
    ap.add_argument("--calib-size", type=int, default=16)
    ap.add_argument("--w8a8", action="store_true")
    ap.add_argument("--schedules", default="",
                    help="comma-separated whole-output schedules (C computes, r reuses) also measured, each at the "
                    "step count and budget whose computing steps it matches")  # fmt: skip
    a = ap.parse_args()
    budgets = [float(b) for b in a.budgets.split(",")]
    RESULTS.mkdir(exist_ok=True)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}")
    for model in a.models:
        prompts = prompt_list(ReportConfig(eval_size=a.eval_size))
        tune = prompt_list(ReportConfig(eval_size=a.tune_size))
        for steps in a.steps:
            root = Path(tempfile.mkdtemp())
            pipe, _, _ = _fresh(model, ())
            fp_result = generate(pipe, prompts, GenerateConfig(steps=steps, progress=False), resolve_target(model),
                                 measure=True)  # fmt: skip
            fp_q = quality(judge_all(fp_result, resolve_target(model).builtin.judge))
            record: dict[str, Any] = {
                "model": model, "steps": steps, "eval_prompts": len(prompts),
                "fp": {"content_accuracy": [fp_q["content_accuracy"], fp_q["content_accuracy_heldout"],
                                            fp_q["content_accuracy_pairs"]],
                       "ms_per_call": round(fp_result.extras["denoiser_ms_per_step"], 2),
                       "denoiser_loop_ms": round(fp_result.extras["denoiser_loop_ms"], 1)},
                "budgets": {},
            }  # fmt: skip
            for budget in budgets:
                t0 = time.perf_counter()
                config = OptimizeConfig(out=root / f"cache-{budget}", recipe=CacheConfig(budget=budget), steps=steps,
                                        calib_size=a.calib_size, progress=False)  # fmt: skip
                bundle = optimize(model, config)
                manifest = json.loads((bundle / "manifest.json").read_text())
                schedule = CacheSchedule.from_dict(manifest["cache"])
                extra = tuple(p for p in a.schedules.split(",") if p)
                rows = _baselines(model, schedule, budget, prompts, tune, steps, fp_result, extra)
                rows["diffkiln"]["schedule"] = schedule.pattern
                rows["diffkiln"]["mechanism"] = schedule.mechanism.value
                rows["diffkiln"]["search_seconds"] = manifest["build_metrics"]["plan_seconds"]
                record["budgets"][str(budget)] = {"rows": rows, "seconds": round(time.perf_counter() - t0, 1)}
                _print(model, steps, budget, record["fp"], rows)
            if a.w8a8:
                record["w8a8"] = _w8a8(model, steps, prompts, fp_result, root, a.calib_size)
                _print(model, steps, 0.5, record["fp"], record["w8a8"])
            (RESULTS / f"bench_cache_{model}_{steps}.json").write_text(json.dumps(record, indent=2) + "\n")


def _print(model: str, steps: int, budget: float, fp: dict[str, Any], rows: dict[str, Any]) -> None:
    print(f"\n{model}, {steps} steps, budget {budget}: FP content accuracy {fp['content_accuracy']}, "
          f"denoiser loop {fp['denoiser_loop_ms']} ms")  # fmt: skip
    print(
        "| method | compute (measured) | content accuracy single / held-out / pairs | latent SQNR vs FP "
        "| denoiser loop / FP's | misses only here / only under the uniform interval (sign test p) |"
    )
    print("|---|---|---|---|---|---|")
    uniform = set(rows.get("uniform interval", {}).get("missed", []))
    for label, r in rows.items():
        if "not_applicable" in r:
            print(f"| {label} | n/a: {r['not_applicable']} | | | | |")
            continue
        acc = " / ".join(f"{v:.2f}" if v is not None else "n/a" for v in r["content_accuracy"])
        ratio = r["denoiser_loop_ms"] / fp["denoiser_loop_ms"]
        here, there = len(set(r["missed"]) - uniform), len(uniform - set(r["missed"]))
        paired = f"{here} / {there} (p={sign_test(here, there):.2f})" if "uniform interval" in rows else ""
        print(f"| {label} | {r['compute_fraction']:.3f} | {acc} | {r['latent_sqnr_db']} dB | {ratio:.2f}x | {paired} |")


if __name__ == "__main__":
    main()
