"""Searched sparse-attention masks against fixed patterns, end to end, at the same measured density.

On a trained video model (shapes-video by default): the FP pipeline with dense attention on the
evaluation prompts (three judged sets, seeds 0..n-1) is the reference. At each ``--densities``
budget, ``diffkiln optimize MODEL --recipe sparse --attn-density D --attn-block B`` searches masks;
two fixed, data-independent patterns are then built over the same layers at the searched masks'
density, and all three run on the same prompts and seeds:

* ``local window`` (Radial / STA style): one 3-D window for every layer, head and step; where no
  single window lands on the density, the two windows around it are dealt to (layer, head) slots,
  evenly spread, so the average does;
* ``spatial-temporal`` (Sparse-VideoGen style): each (layer, head) slot attends either within its
  frame (spatial) or to the same place across frames (temporal); the share of temporal slots sets
  the density.

Every pattern keeps the text blocks and the sink, as the searched families do. Measured per row:
the density as the kernels ran, content accuracy per set and per attribute (motion included),
latent SQNR against FP, and the denoiser loop's wall time, side by side in one process. Results go to
``tools/results/bench_sparse_video_<model>.json``; the table is printed as markdown.

Usage: python tools/bench_sparse_video.py [--model shapes-video] [--densities 0.35 0.2] [--eval-size 8]
[--block 32] [--groups G] [--searched-only] [--prompt-seed S]
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from diffkiln.api import OptimizeConfig, SparseConfig, optimize
from diffkiln.core.sparse_plan import LayerMasks, SparsePlan, pack_mask
from diffkiln.generation import GenerateConfig, generate, load_pipeline
from diffkiln.kernels.sparse_attention import BlockLayout
from diffkiln.nn.sparse_attention import sparse_plan_applied
from diffkiln.optimizer.attention_masks import MaskFamily, TokenGrid, family_mask
from diffkiln.report.compare import fidelity
from diffkiln.report.evaluate import ReportConfig, judge_all, prompt_list, quality
from diffkiln.zoo.registry import JudgeKind, resolve_target
from diffkiln.zoo.shapes import PromptSet
from diffkiln.zoo.shapes.video import eval_video_scenes

RESULTS = Path(__file__).resolve().parent / "results"
WINDOWS = [(f, r, c) for f in range(0, 9) for r, c in ((0, 0), (1, 1), (2, 2), (4, 4), (1 << 20, 1 << 20))]
"""The local windows a fixed pattern may use: frame gaps 0..8 times a few spatial extents."""
CALL_KWARGS: tuple[tuple[str, Any], ...] = ()
"""Pipeline-call arguments for a folder (``--call-arg k=v``); a built-in model brings its own."""


def _density(mask: torch.Tensor, lm: LayerMasks, block: int) -> float:
    return BlockLayout.from_mask(mask[None], lm.q_len, lm.kv_len, block).density


def masked_density(plan: SparsePlan) -> float:
    """Kept over dense attention FLOPs over the masked layers' calls (step groups by their length)."""
    starts = [*plan.group_starts, plan.steps]
    kept = total = 0.0
    for lm in plan.layers:
        for g in range(len(plan.group_starts)):
            weight = (starts[g + 1] - starts[g]) * lm.q_len * lm.kv_len
            for h in range(lm.heads):
                kept += weight * _density(lm.mask(g, h, plan.block), lm, plan.block)
                total += weight
    return kept / total


def _deal(slots: int, count: int) -> list[bool]:
    """``count`` of ``slots`` marked, spread evenly."""
    return [int((i + 1) * count / slots) > int(i * count / slots) for i in range(slots)]


def _fixed_plan(plan: SparsePlan, name: str, masks: list[list[tuple[str, torch.Tensor]]]) -> SparsePlan:
    """``plan``'s layers and step groups with one (label, mask) per layer and head for every group."""
    layers = []
    for lm, heads in zip(plan.layers, masks, strict=True):
        fams = tuple(label for label, _ in heads)
        packed = tuple(pack_mask(m) for _, m in heads)
        groups = len(plan.group_starts)
        layers.append(LayerMasks(lm.layer, lm.heads, lm.q_len, lm.kv_len, dict(lm.grid), (fams,) * groups,
                                 (packed,) * groups))  # fmt: skip
    fixed = SparsePlan(plan.block, plan.steps, plan.calls_per_step, plan.group_starts, tuple(layers), 1.0, 1.0,
                       {"fixed": name})  # fmt: skip
    d = masked_density(fixed)
    return SparsePlan(plan.block, plan.steps, plan.calls_per_step, plan.group_starts, tuple(layers), d,
                      min(1.0, max(d, 1e-6)), {"fixed": name})  # fmt: skip


def _mix(plan: SparsePlan, target: float, options: list[tuple[str, list[torch.Tensor]]]) -> list[list[tuple[str, Any]]]:
    """Deal two options (each: label and one mask per layer) over the (layer, head) slots so that
    the average density is the closest to ``target`` from below (or the sparsest option)."""
    slots = [(i, h) for i, lm in enumerate(plan.layers) for h in range(lm.heads)]
    dens = [[_density(m, lm, plan.block) for m, lm in zip(masks, plan.layers, strict=True)] for _, masks in options]
    avg = [sum(d[i] for i, _ in slots) / len(slots) for d in dens]
    order = sorted(range(len(options)), key=lambda o: avg[o])
    below = [o for o in order if avg[o] <= target + 1e-9]
    above = [o for o in order if avg[o] > target + 1e-9]
    lo = below[-1] if below else order[0]
    hi = above[0] if above else lo
    count = 0 if hi == lo else int((target - avg[lo]) / (avg[hi] - avg[lo]) * len(slots))
    chosen = _deal(len(slots), max(0, min(count, len(slots))))
    out: list[list[tuple[str, Any]]] = [[("", None)] * lm.heads for lm in plan.layers]
    for (i, h), use_hi in zip(slots, chosen, strict=True):
        label, masks = options[hi if use_hi else lo]
        out[i][h] = (label, masks[i])
    return out


def _grid(lm: LayerMasks) -> TokenGrid:
    g = lm.grid
    return TokenGrid(g["frames"], g["height"], g["width"], g.get("prefix", 0), g.get("suffix", 0))


def local_window_plan(plan: SparsePlan, target: float) -> SparsePlan:
    """The ``local window`` pattern at ``target`` density (see the module docstring)."""
    options = [(f"local{w}", [family_mask(_grid(lm), plan.block, MaskFamily.LOCAL, w) for lm in plan.layers])
               for w in WINDOWS]  # fmt: skip
    return _fixed_plan(plan, "local window", _mix(plan, target, options))


def spatial_temporal_plan(plan: SparsePlan, target: float) -> SparsePlan:
    """The ``spatial-temporal`` pattern at ``target`` density (see the module docstring)."""
    options = [(fam.value, [family_mask(_grid(lm), plan.block, fam) for lm in plan.layers])
               for fam in (MaskFamily.SPATIAL, MaskFamily.TEMPORAL)]  # fmt: skip
    return _fixed_plan(plan, "spatial-temporal", _mix(plan, target, options))


def _run(model: str, pipe: Any, denoiser: Any, prompts: list[str], steps: int, fp: Any,
         plan: SparsePlan | None) -> dict[str, Any]:  # fmt: skip
    resolved = resolve_target(model)
    config = GenerateConfig(steps=steps, progress=False, call_kwargs=CALL_KWARGS)
    if plan is None:
        result, density = generate(pipe, prompts, config, resolved, measure=True), 1.0
    else:
        with sparse_plan_applied(denoiser, plan, pipe.scheduler) as run:
            result = generate(pipe, prompts, config, resolved, measure=True)
            density = run.density or 1.0
    q = quality(judge_all(result, JudgeKind.SHAPES_VIDEO))
    return {
        "density_measured": round(density, 4),
        "content_accuracy": [q["content_accuracy"], q["content_accuracy_heldout"], q["content_accuracy_pairs"]],
        "attribute_accuracy": q["attribute_accuracy"],
        "latent_sqnr_db": round(fidelity(fp, result)["latent_sqnr_db"], 2) if fp is not None else None,
        "denoiser_loop_ms": round(result.extras["denoiser_loop_ms"], 1),
        "result": result,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="shapes-video")
    ap.add_argument("--densities", type=float, nargs="+", default=[0.35, 0.2])
    ap.add_argument("--eval-size", type=int, default=8, help="prompts per set")
    ap.add_argument(
        "--calib-size",
        type=int,
        default=12,
        help="calibration prompts: the attention statistics come from the first batch of 8, and the search "
        "validates on the prompts after it",
    )
    ap.add_argument("--block", type=int, default=32, help="tokens per mask block (searched and fixed alike)")
    ap.add_argument("--steps", type=int, default=None, help="sampler steps (default: the model's)")
    ap.add_argument(
        "--results",
        type=Path,
        default=None,
        help="where the raw results go (default: tools/results/bench_sparse_video_MODEL.json)",
    )
    ap.add_argument("--validate-samples", type=int, default=4, help="the search's validation samples per proposal")
    ap.add_argument(
        "--prompt-seed",
        type=int,
        default=0,
        help="draw the judged prompts with this seed: 0 (default) is the evaluation set reports use; "
        "another seed gives a development set for choosing search settings without touching it",
    )
    ap.add_argument("--groups", type=int, default=None, help="the search's step groups (default: SparseConfig's)")
    ap.add_argument("--searched-only", action="store_true", help="skip the two fixed patterns")
    ap.add_argument(
        "--call-arg",
        action="append",
        default=[],
        metavar="K=V",
        help="a pipeline-call argument for a folder (height, width, num_frames, ...), integers",
    )
    a = ap.parse_args()
    global CALL_KWARGS
    CALL_KWARGS = tuple((k, int(v)) for k, v in (c.split("=", 1) for c in a.call_arg))
    RESULTS.mkdir(exist_ok=True)
    resolved = resolve_target(a.model)
    steps = a.steps or (resolved.builtin.default_steps if resolved.builtin else 20)
    prompts = (
        prompt_list(ReportConfig(eval_size=a.eval_size), JudgeKind.SHAPES_VIDEO)
        if a.prompt_seed == 0
        else [s.prompt for ps in PromptSet for s in eval_video_scenes(ps, a.eval_size, seed=a.prompt_seed)]
    )
    pipe = load_pipeline(a.model)
    root = Path(tempfile.mkdtemp())
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, {platform.processor() or platform.machine()}")
    fp = _run(a.model, pipe, None, prompts, steps, None, None)
    fp_result = fp.pop("result")
    record: dict[str, Any] = {"model": a.model, "steps": steps, "eval_prompts": len(prompts), "block": a.block,
                              "groups": a.groups, "prompt_seed": a.prompt_seed, "fp": fp, "densities": {}}  # fmt: skip
    for budget in a.densities:
        t0 = time.perf_counter()
        search = SparseConfig(
            density=budget,
            block=a.block,
            validate_samples=a.validate_samples,
            **({} if a.groups is None else {"groups": a.groups}),
        )
        bundle = optimize(a.model, OptimizeConfig(out=root / f"sparse-{budget}", steps=steps, calib_size=a.calib_size,
                                                  recipe=search, progress=False, cache_dir=root / "cache",
                                                  call_kwargs=CALL_KWARGS))  # fmt: skip
        build_s = time.perf_counter() - t0
        manifest = json.loads((bundle / "manifest.json").read_text())
        plan = SparsePlan.from_dict(manifest["sparsity"])
        denoiser = getattr(pipe, manifest["pipeline"]["denoiser"])
        target = masked_density(plan)
        rows: dict[str, Any] = {}
        patterns = [("diffkiln", plan)]
        if not a.searched_only:
            patterns += [("local window", local_window_plan(plan, target)),
                         ("spatial-temporal", spatial_temporal_plan(plan, target))]  # fmt: skip
        for name, p in patterns:
            rows[name] = _run(a.model, pipe, denoiser, prompts, steps, fp_result, p)
            rows[name].pop("result")
            rows[name]["families"] = sorted({f for lm in p.layers for g in lm.families for f in g})[:6]
        rows["diffkiln"]["build_seconds"] = round(build_s, 1)
        rows["diffkiln"]["search_seconds"] = manifest["build_metrics"].get("plan_seconds")
        rows["diffkiln"]["search"] = {k: v for k, v in plan.search.items() if k != "families"}
        record["densities"][str(budget)] = rows
        _print(a.model, budget, fp, rows)
    (a.results or RESULTS / f"bench_sparse_video_{Path(a.model).name}.json").write_text(
        json.dumps(record, indent=2) + "\n"
    )


def _print(model: str, budget: float, fp: dict[str, Any], rows: dict[str, Any]) -> None:
    print(f"\n{model}, budget {budget}: FP content accuracy {fp['content_accuracy']}, loop {fp['denoiser_loop_ms']} ms")
    print(
        "| masks | density (ran) | content accuracy (single / held-out / pairs) | motion | latent SQNR dB | loop ms |"
    )
    print("|---|---|---|---|---|---|")
    for name, r in rows.items():
        acc = " / ".join("-" if x is None else f"{x:.2f}" for x in r["content_accuracy"])
        motion = r["attribute_accuracy"].get("motion")
        print(f"| {name} | {r['density_measured']:.3f} | {acc} | {motion if motion is None else f'{motion:.2f}'} | "
              f"{r['latent_sqnr_db']} | {r['denoiser_loop_ms']} |")  # fmt: skip


if __name__ == "__main__":
    main()
