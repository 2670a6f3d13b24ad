"""BOS-aware W8A8 against plain W8A8 on a text encoder whose BOS row is an outlier, as real CLIP's is.

Real CLIP's last hidden state has a BOS row far larger than the other tokens' (reported at about
828 against 10-15 in the MixDQ write-up), and that row is what MixDQ's BOS-aware quantization keeps out of
the cross-attention to_k/to_v activation range. Until 2026-12-03 the built-in models' tiny
CLIPs had no such outlier (|BOS| 3.6 vs 3.8 on shapes-unet), so on them BOS-awareness could not
show an effect; shapes-unet's has one now (|BOS| about 265 vs 5), and shapes-dit's CLIPs still do not.

This benchmark gives the model's text encoder a CLIP-like outlier (``diffkiln.zoo.outliers``: a
named, scoped forward hook), in one of two forms (``--outlier``):

* ``row``: the BOS output row is multiplied by each ``--bos-scale``. The outlier then reaches the
  denoiser through to_k/to_v as well, so it changes the FP model, not only its quantization;
* ``channel`` (default): each ``--bos-scale`` is added to two channels of the BOS row, and the
  cross-attention to_k/to_v weights of those two input channels are zeroed, so the FP model's
  output does not depend on the outlier at all (as an attention sink's value is near zero) and
  only the quantizer's activation range sees it. This isolates what BOS-awareness is for;
* ``none``: the model as shipped, no hook, no blinded weights. Since 2026-12-03 the built-in
  shapes-unet's own CLIP carries a CLIP-like BOS outlier in its weights (one residual channel,
  ``diffkiln.zoo.outliers.impose_bos_massive_activation``), so this measures the real thing.

The FP reference, calibration and every quantized pipeline run under the same hook and weights,
so the comparison isolates the quantizer: latent SQNR of each W8A8 variant (smoothing off, as in
MixDQ; plus both with SmoothQuant ``auto``, diffkiln's default) against the FP pipeline on the same held-out
prompts and seeds. Size 0 (channel) or 1 (row): no outlier (in channel mode the blinded
weights still apply).

Usage:
    python tools/bench_bos.py --model shapes-unet --outlier channel --bos-scale 0,100,800
    python tools/bench_bos.py --model shapes-unet --outlier none
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def _latents(pipe: Any, prompts: list[str], steps: int, guidance: float) -> Any:
    import torch

    pipe.set_progress_bar_config(disable=True)
    gens = [torch.Generator().manual_seed(1000 + i) for i in range(len(prompts))]
    with torch.no_grad():
        return pipe(prompts, num_inference_steps=steps, guidance_scale=guidance, generator=gens,
                    output_type="latent").images  # fmt: skip


def _bos_ratio(pipe: Any, prompts: list[str]) -> tuple[float, float]:
    """(absmax of the BOS row, absmax of every other row) of the text encoder's output."""
    import torch

    ids = pipe.tokenizer(prompts, padding="max_length", max_length=pipe.tokenizer.model_max_length,
                         truncation=True, return_tensors="pt").input_ids  # fmt: skip
    with torch.no_grad():
        hidden = pipe.text_encoder(ids)[0]
    return float(hidden[:, 0].abs().max()), float(hidden[:, 1:].abs().max())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="shapes-unet", help="a built-in model or folder with a CLIP text encoder")
    parser.add_argument(
        "--outlier",
        choices=("channel", "row", "none"),
        default="channel",
        help="outlier form; none: the model as shipped (default channel)",
    )
    parser.add_argument("--bos-scale", default="0,100,800", help="outlier sizes to measure (default 0,100,800)")
    parser.add_argument("--calib-prompts", type=int, default=16, help="calibration prompts (default 16)")
    parser.add_argument("--eval-prompts", type=int, default=16, help="held-out evaluation prompts (default 16)")
    parser.add_argument("--steps", type=int, default=20, help="sampler steps (default 20)")
    parser.add_argument("--guidance", type=float, default=5.0, help="guidance scale (default 5.0)")
    parser.add_argument("--out", type=Path, default=ROOT / "tools" / "results" / "bos_vs_plain_imposed_outlier.json")
    args = parser.parse_args()

    import torch

    from diffkiln.calibrate import CalibrationConfig, calibrate
    from diffkiln.core.metrics import sqnr_db
    from diffkiln.generation import load_pipeline
    from diffkiln.nn import apply_plan
    from diffkiln.optimizer import SearchContext, SmoothMode, W8A8Config, make_plan
    from diffkiln.zoo.outliers import blind_cross_attention, bos_outlier
    from diffkiln.zoo.registry import get_builtin

    pipe = load_pipeline(args.model)
    blinded = blind_cross_attention(pipe.unet) if args.outlier == "channel" else 0
    kind = "channel" if args.outlier == "none" else args.outlier  # none: size 0, so no hook at all
    scales = [0.0] if args.outlier == "none" else [float(s) for s in args.bos_scale.split(",")]
    prompts = get_builtin("shapes-unet").calibration_prompts(args.calib_prompts + args.eval_prompts) or []
    calib, evals = prompts[: args.calib_prompts], prompts[args.calib_prompts :]
    rows = []
    for scale in scales:
        t0 = time.perf_counter()
        with bos_outlier(pipe, scale, kind):
            bos, others = _bos_ratio(pipe, evals)
            # No disk cache: the hook changes the activations but not the weights the key hashes.
            stats = calibrate(pipe, CalibrationConfig(tuple(calib), steps=args.steps, guidance=args.guidance,
                                                      cache_dir=None, progress=False))  # fmt: skip
            ref = _latents(pipe, evals, args.steps, args.guidance)
        row: dict[str, Any] = {"bos_scale": scale, "bos_absmax": round(bos, 2), "others_absmax": round(others, 2),
                               "invariant_positions": stats.invariant_positions()}  # fmt: skip
        variants = {
            "bos_aware": W8A8Config(bos_aware=True, smooth=SmoothMode.OFF),
            "plain": W8A8Config(bos_aware=False, smooth=SmoothMode.OFF),
            "plain_smooth_auto": W8A8Config(bos_aware=False, smooth=SmoothMode.AUTO),
            "bos_aware_smooth_auto": W8A8Config(bos_aware=True, smooth=SmoothMode.AUTO),
        }
        for label, qconfig in variants.items():
            plan = make_plan(pipe, stats, qconfig, SearchContext(source_id=args.model))
            qpipe = apply_plan(pipe, plan, stats)  # copied outside the hook, then hooked like the FP one
            with bos_outlier(qpipe, scale, kind):
                out = _latents(qpipe, evals, args.steps, args.guidance)
            per = [sqnr_db(r, o) for r, o in zip(ref, out, strict=True)]
            row[label] = {"latent_sqnr_db": round(sqnr_db(ref, out), 2),
                          "median_prompt_db": round(float(torch.tensor(per).median()), 2),
                          "worst_prompt_db": round(min(per), 2)}  # fmt: skip
            del qpipe
        row["seconds"] = round(time.perf_counter() - t0, 1)
        rows.append(row)
        print(json.dumps(row), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"model": args.model, "outlier": args.outlier, "blinded_attentions": blinded,
                                    "steps": args.steps, "guidance": args.guidance,
                                    "calib_prompts": len(calib), "eval_prompts": len(evals), "rows": rows},
                                   indent=2))  # fmt: skip
    print(f"outlier: {args.outlier}; latent SQNR vs FP, pooled / median prompt / worst prompt")
    print("| outlier | \\|BOS\\| vs others | BOS-aware W8A8 | plain W8A8 | plain W8A8 + SmoothQuant auto "
          "| BOS-aware + SmoothQuant auto (default) |")  # fmt: skip
    print("|---|---|---|---|---|---|")
    for r in rows:
        cells = [f"{v['latent_sqnr_db']} / {v['median_prompt_db']} / {v['worst_prompt_db']} dB"
                 for v in (r["bos_aware"], r["plain"], r["plain_smooth_auto"], r["bos_aware_smooth_auto"])]  # fmt: skip
        print(f"| {r['bos_scale']:g} | {r['bos_absmax']} vs {r['others_absmax']} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
