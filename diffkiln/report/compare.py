"""Bundle-vs-FP comparison: fidelity, isolated per-layer SQNR, and the regression gate."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from diffkiln.core import metrics
from diffkiln.core.hooks import scoped_hooks
from diffkiln.core.pipelines import find_denoiser
from diffkiln.generation import GenerationResult

__all__ = ["QUALITY_GATE_KEYS", "fidelity", "per_layer_sqnr", "regressions"]

QUALITY_GATE_KEYS = (
    "quality.content_accuracy",
    "quality.content_accuracy_heldout",
    "quality.content_accuracy_pairs",
    "fidelity.latent_sqnr_db",
)


MODE_FLIP_DB = 10.0
"""A prompt whose own latent SQNR is below this has left the FP trajectory (another layout)."""


def fidelity(reference: GenerationResult, test: GenerationResult) -> dict[str, float | None]:
    """Latent SQNR and mean image PSNR/SSIM of ``test`` against ``reference``.

    ``latent_sqnr_db`` pools every prompt's error (the headline figure; one prompt whose sample
    flips to another layout can dominate it), so the per-prompt distribution is reported beside
    it: median, worst, and how many prompts fall below :data:`MODE_FLIP_DB`.
    """
    ref_lat, test_lat = reference.extras.get("latents"), test.extras.get("latents")
    sqnr = metrics.sqnr_db(ref_lat, test_lat) if ref_lat is not None and test_lat is not None else None
    per_prompt: dict[str, float | None] = {}
    if ref_lat is not None and test_lat is not None:
        vals = [min(metrics.sqnr_db(r, t), 999.0) for r, t in zip(ref_lat, test_lat, strict=True)]
        per_prompt = {
            "latent_sqnr_db_median_prompt": float(np.median(vals)),
            "latent_sqnr_db_worst_prompt": float(np.min(vals)),
            "prompts_below_10db": int(sum(v < MODE_FLIP_DB for v in vals)),
        }
    psnr = [metrics.psnr_db(np.asarray(a), np.asarray(b)) for a, b in zip(reference.images, test.images, strict=True)]
    ssim = [metrics.ssim(np.asarray(a), np.asarray(b)) for a, b in zip(reference.images, test.images, strict=True)]
    finite = [p for p in psnr if np.isfinite(p)]
    return {
        "latent_sqnr_db": sqnr if sqnr is None or np.isfinite(sqnr) else 999.0,
        "image_psnr_db": float(np.mean(finite)) if finite else 999.0,
        "image_ssim": float(np.mean(ssim)),
        **per_prompt,
    }


def per_layer_sqnr(
    fp_pipe: Any,
    q_pipe: Any,
    prompt: str,
    steps: int,
    guidance: float,
    call_kwargs: dict[str, Any] | None = None,
) -> dict[str, float]:
    """Isolated SQNR of each quantized layer: its output on the FP model's own input, at the middle step.

    The FP pipeline runs one generation; each quantized layer of ``q_pipe`` then receives exactly
    the input its FP counterpart saw, so upstream error does not mix in.

    Args:
        fp_pipe: the FP pipeline.
        q_pipe: the bundle's pipeline.
        prompt: the prompt of the one generation.
        steps: sampler steps.
        guidance: guidance scale.
        call_kwargs: extra pipeline-call arguments (e.g. a tiny model's size). Default none.
    """
    fp_den, q_den = find_denoiser(fp_pipe), find_denoiser(q_pipe)
    q_modules = dict(q_den.named_modules())
    fp_modules = dict(fp_den.named_modules())
    names = [n for n, m in q_modules.items() if type(m).__name__ in ("QLinear", "QConv2d") and n in fp_modules]
    captured: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    calls = {"n": 0}
    target_call = steps // 2

    def count(*_a: Any) -> None:
        calls["n"] += 1

    with scoped_hooks() as hooks, torch.no_grad():
        hooks.add_forward_pre_hook("diffkiln.report.count", fp_den, lambda m, a, k: count())
        for name in names:

            def grab(_m: nn.Module, args: tuple[Any, ...], _k: dict[str, Any], out: Any, name: str = name) -> None:
                if calls["n"] - 1 == target_call and name not in captured:
                    captured[name] = (args[0].detach(), out.detach())

            hooks.add_forward_hook(f"diffkiln.report.{name}", fp_modules[name], grab)
        fp_pipe.set_progress_bar_config(disable=True)
        fp_pipe(
            prompt=[prompt],
            num_inference_steps=steps,
            guidance_scale=guidance,
            generator=torch.Generator().manual_seed(0),
            output_type="latent",
            **(call_kwargs or {}),
        )
    out = {}
    with torch.no_grad():
        for name, (x, y) in captured.items():
            out[name] = metrics.sqnr_db(y, q_modules[name](x))
    return out


def _get(d: dict[str, Any], dotted: str) -> Any:
    for part in dotted.split("."):
        if not isinstance(d, dict) or part not in d:
            return None
        d = d[part]
    return d


def regressions(new: dict[str, Any], old: dict[str, Any], tolerance: float, sqnr_tolerance_db: float) -> list[str]:
    """The quality figures of ``new`` that fell below ``old`` by more than the tolerance.

    Args:
        new: this report's data.
        old: the reference report's data.
        tolerance: allowed drop of a content accuracy (absolute, 0..1).
        sqnr_tolerance_db: allowed drop of latent SQNR in dB.
    """
    problems = []
    for key in QUALITY_GATE_KEYS:
        a, b = _get(new, key), _get(old, key)
        if a is None or b is None:
            continue
        tol = sqnr_tolerance_db if key.endswith("_db") else tolerance
        if a < b - tol:
            problems.append(f"{key} fell from {b:.4g} to {a:.4g} (tolerance {tol:g})")
    return problems
