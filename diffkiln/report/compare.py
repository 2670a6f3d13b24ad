"""Bundle-vs-FP comparison: fidelity, isolated per-layer SQNR, and the regression gate."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from diffkiln.core import metrics
from diffkiln.core.errors import InvalidInputError
from diffkiln.core.hooks import layer_input, scoped_hooks
from diffkiln.core.pipelines import find_denoiser
from diffkiln.generation import GenerationResult
from diffkiln.nn import QConv, QLinear

__all__ = [
    "QUALITY_GATE_KEYS",
    "check_same_model",
    "fidelity",
    "format_quality",
    "onnx_denoiser_sizes",
    "per_layer_sqnr",
    "read_report",
    "regressions",
]

QUALITY_GATE_KEYS = (
    "quality.content_accuracy",
    "quality.content_accuracy_heldout",
    "quality.content_accuracy_pairs",
    "fidelity.latent_sqnr_db",
)


MODE_FLIP_DB = 10.0
"""A prompt whose own latent SQNR is below this has left the FP trajectory (another layout)."""


def fidelity(reference: GenerationResult, test: GenerationResult) -> dict[str, float | None]:
    """Fidelity of ``test`` against ``reference`` (the same inputs and seeds).

    * ``latent_sqnr_db``: the final latents, every sample's error pooled (the headline figure; one
      sample that flips to another layout can dominate it), with the per-sample distribution beside
      it: median, worst, and how many fall below :data:`MODE_FLIP_DB`;
    * images and video frames: mean ``image_psnr_db`` and ``image_ssim``;
    * audio: mean ``audio_snr_db`` of the waveforms.
    """
    ref_lat, test_lat = reference.extras.get("latents"), test.extras.get("latents")
    out: dict[str, float | None] = {"latent_sqnr_db": None}
    if ref_lat is not None and test_lat is not None and ref_lat.shape == test_lat.shape:
        sqnr = metrics.sqnr_db(ref_lat, test_lat)
        vals = [min(metrics.sqnr_db(r, t), 999.0) for r, t in zip(ref_lat, test_lat, strict=True)]
        out.update({
            "latent_sqnr_db": sqnr if np.isfinite(sqnr) else 999.0,
            "latent_sqnr_db_median_prompt": float(np.median(vals)),
            "latent_sqnr_db_worst_prompt": float(np.min(vals)),
            "prompts_below_10db": int(sum(v < MODE_FLIP_DB for v in vals)),
        })  # fmt: skip
    if reference.audios is not None and test.audios is not None:
        snr = [min(metrics.sqnr_db(r, t), 999.0) for r, t in zip(reference.audios, test.audios, strict=True)]
        out["audio_snr_db"] = float(np.mean(snr))
        return out
    ref_frames = [f for clip in reference.videos for f in clip] if reference.videos else reference.images
    test_frames = [f for clip in test.videos for f in clip] if test.videos else test.images
    pairs = list(zip(ref_frames, test_frames, strict=True))
    psnr = [metrics.psnr_db(np.asarray(a), np.asarray(b)) for a, b in pairs]
    finite = [p for p in psnr if np.isfinite(p)]
    small = any(min(np.asarray(a).shape[:2]) < 11 for a, _ in pairs)
    out["image_psnr_db"] = float(np.mean(finite)) if finite else 999.0
    ssim = [metrics.ssim(np.asarray(a), np.asarray(b)) for a, b in pairs] if not small else []
    out["image_ssim"] = float(np.mean(ssim)) if ssim else None
    return out


def per_layer_sqnr(
    fp_pipe: Any, q_pipe: Any, call: dict[str, Any], denoiser: str | None = None, at_call: int | None = None
) -> dict[str, float]:
    """Isolated SQNR of each quantized layer: its output on the FP model's own input, at the middle step.

    The FP pipeline runs one generation; each quantized layer of ``q_pipe`` then receives exactly
    the input its FP counterpart saw, so upstream error does not mix in.

    Args:
        fp_pipe: the FP pipeline.
        q_pipe: the bundle's pipeline.
        call: the full arguments of the one FP pipeline call (one sample, steps, call arguments).
        denoiser: the denoiser component's name (or a quantized expert's); None finds it.
        at_call: which of the model's calls to take; None: the middle step's (an expert, which
            runs at only some of the steps, takes its first: 0).
    """
    fp_den, q_den = find_denoiser(fp_pipe, denoiser), find_denoiser(q_pipe, denoiser)
    q_modules = dict(q_den.named_modules())
    fp_modules = dict(fp_den.named_modules())
    names = [n for n, m in q_modules.items() if isinstance(m, (QLinear, QConv)) and n in fp_modules]
    captured: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    calls = {"n": 0}
    target_call = int(call.get("num_inference_steps", 2)) // 2 if at_call is None else at_call

    def count(*_a: Any) -> None:
        calls["n"] += 1

    with scoped_hooks() as hooks, torch.no_grad():
        hooks.add_forward_pre_hook("diffkiln.report.count", fp_den, lambda m, a, k: count())
        for name in names:

            def grab(_m: nn.Module, args: tuple[Any, ...], k: dict[str, Any], out: Any, name: str = name) -> None:
                if calls["n"] - 1 == target_call and name not in captured:
                    captured[name] = (layer_input(args, k).detach(), out.detach())

            hooks.add_forward_hook(f"diffkiln.report.{name}", fp_modules[name], grab)
        fp_pipe.set_progress_bar_config(disable=True)
        fp_pipe(**call)
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


def read_report(path: Path) -> dict[str, Any]:
    """An earlier ``report.json``, for :func:`regressions`.

    Raises:
        InvalidInputError: the file is missing, unreadable, or not a diffkiln report.
    """
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InvalidInputError(f"--fail-on-regression: {path} does not exist") from None
    except (OSError, ValueError) as exc:
        raise InvalidInputError(f"--fail-on-regression: {path} is not a readable report.json ({exc})") from None
    if not isinstance(data, dict) or "report_version" not in data:
        raise InvalidInputError(f"--fail-on-regression: {path} is not a diffkiln report.json")
    return data


def format_quality(data: dict[str, Any]) -> str | None:
    """One line of a report's judged quality, or None when it has none."""
    q = data.get("quality")
    if not q:
        return None

    def fmt(v: float | None) -> str:
        return "n/a" if v is None else f"{v:.3f}"

    return (
        f"content_accuracy={fmt(q['content_accuracy'])} heldout={fmt(q['content_accuracy_heldout'])} "
        f"pairs={fmt(q['content_accuracy_pairs'])} (n={q['n_prompts']})"
    )


def check_same_model(base: Any, pipeline: dict[str, Any], weight_hash: str | None, source: str) -> None:
    """Refuse a baseline that is not the bundle's source model: another pipeline or denoiser class
    (``pipeline``: the manifest's ``pipeline`` section), or other weights than ``weight_hash``. A
    fidelity figure against another model would look meaningful and mean nothing.

    Raises:
        InvalidInputError: naming what differs and the fix.
    """
    from diffkiln.core.pipelines import pipeline_weight_hash

    fix = "pass the model the bundle was built from, or --force-baseline to compare anyway"
    want = pipeline.get("class")
    if want and type(base).__name__ != want:
        raise InvalidInputError(f"--baseline {source!r} is a {type(base).__name__}, the bundle a {want}; {fix}")
    denoiser = getattr(base, pipeline["denoiser"], None)
    want_denoiser = pipeline.get("denoiser_class")
    if want_denoiser and type(denoiser).__name__ != want_denoiser:
        raise InvalidInputError(
            f"--baseline {source!r}'s denoiser is a {type(denoiser).__name__}, the bundle's a {want_denoiser}; {fix}"
        )
    if weight_hash and pipeline_weight_hash(base) != weight_hash:
        raise InvalidInputError(
            f"--baseline {source!r} has other weights than the model the bundle was built from "
            f"(weight hash recorded {weight_hash[:12]}...); {fix}"
        )


def onnx_denoiser_sizes(folder: Path, manifest: dict[str, Any], base: Any) -> tuple[int, int]:
    """(bytes of an ONNX export's denoiser graphs, the FP baseline denoiser's FP16 bytes), its
    experts' (Wan 2.2's ``transformer_2``) included in both."""
    names = [manifest["pipeline"]["denoiser"], *manifest["pipeline"].get("experts", [])]
    files = {manifest["components"][name]["file"] for name in names}
    if manifest.get("cache_graph"):
        files.add(str(manifest["cache_graph"].get("file", "")))
    stored = sum((folder / f).stat().st_size for f in files if f and (folder / f).is_file())
    models = [getattr(base, name) for name in names]
    fp16 = 2 * sum(t.numel() for m in models for t in [*m.parameters(), *m.buffers()])
    return stored, fp16
