"""A bundle's summary for ``diffkiln inspect``: read from the verified manifest and file sizes."""

from __future__ import annotations

import json
import math
import os
from collections import Counter
from pathlib import Path
from typing import Any

from safetensors import safe_open

from diffkiln.core.plan import calibration_record
from diffkiln.core.schema import read_manifest, verify_files
from diffkiln.runtime.reader import quantized_components

__all__ = ["denoiser_sizes", "format_summary", "summarize"]

_BYTES = {"I8": 1, "U8": 1, "I32": 4, "I64": 8, "F32": 4, "F16": 2, "BF16": 2, "F64": 8, "BOOL": 1}


def denoiser_sizes(bundle: Path, manifest: dict[str, Any]) -> tuple[int, int]:
    """(stored bytes, FP16 bytes) of the denoiser and its quantized experts together.

    Stored bytes count every tensor they keep (int8 and packed weights, scales, BOS rows, FP
    tensors); the FP16 figure counts 2 bytes per element of the original float model: quantized
    weights and biases at their float shapes, every FP tensor, and the derived buffers an FP16
    checkpoint holds (persistent ones; the bundle rebuilds them instead of storing them).
    """
    sizes = [_component_sizes(bundle, quant) for _, quant in quantized_components(manifest).values()]
    return sum(s for s, _ in sizes), sum(f for _, f in sizes)


def _component_sizes(bundle: Path, quant: dict[str, Any]) -> tuple[int, int]:
    """(stored bytes, FP16 bytes) of one quantized component (see :func:`denoiser_sizes`)."""
    stored = fp16 = 0
    layers = quant["layers"]
    with safe_open(str(bundle / quant["weights_file"]), "pt") as f:
        for key in f.keys():  # noqa: SIM118 - safe_open is not a mapping
            sl = f.get_slice(key)
            stored += math.prod(sl.get_shape()) * _BYTES.get(sl.get_dtype(), 4)
            layer, _, suffix = key.partition("::")
            if key.startswith("fp::") or suffix in ("weight_q", "bias"):
                fp16 += math.prod(sl.get_shape()) * 2
            elif suffix == "weight_packed":  # the float weight's shape is in the layer's meta
                fp16 += math.prod(layers[layer]["meta"]["weight_shape"]) * 2
    for record in quant.get("derived_buffers", {}).values():  # format version 4
        if record["persistent"]:
            fp16 += math.prod(record["shape"]) * 2
    return stored, fp16


def _layers_by_bits(quant: dict[str, Any]) -> dict[str, int]:
    bits = Counter(f"W{info['bits']}A{info['act']['bits'] if info['act'] else 16}" for info in quant["layers"].values())
    bits["FP"] = len(quant["fp_layers"])
    return dict(bits)


def _experts(bundle: Path, manifest: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Each quantized expert in brief: its layers by bit-width, average bits and sizes."""
    out = {}
    for name, entry in (manifest.get("experts") or {}).items():
        stored, fp16 = _component_sizes(bundle, entry["quant"])
        out[name] = {"class": entry["denoiser_class"], "layers_by_bits": _layers_by_bits(entry["quant"]),
                     "avg_weight_bits": entry["quant"]["avg_weight_bits"],
                     "avg_act_bits": entry["quant"]["avg_act_bits"], "bytes": stored, "fp16_bytes": fp16}  # fmt: skip
    return out


def summarize(bundle: str | os.PathLike[str]) -> dict[str, Any]:
    """Verify a bundle and summarize it: components, layer counts by bit-width, sizes, BOS, build metrics.

    Raises:
        BundleError: the bundle fails its checks.
    """
    path = Path(bundle)
    manifest = read_manifest(path)
    verify_files(path, manifest)
    quant = manifest["quant"]
    stored, fp16 = _component_sizes(path, quant)
    return {
        "version": manifest["version"],
        "recipe": quant["recipe"],
        "source": manifest["source"],
        "pipeline": manifest["pipeline"]["class"] or "(a bare module)",
        "denoiser": manifest["pipeline"]["denoiser_class"],
        "denoiser_evidence": _denoiser_evidence(manifest),
        "components": manifest["pipeline"]["components"],
        "layers_by_bits": _layers_by_bits(quant),
        "smoothed_layers": sum(
            any(t.endswith("::smooth_inv") for t in info.get("tensors", [])) for info in quant["layers"].values()
        ),
        "requantized_outputs": sum(
            any(t.endswith("::output_scale") for t in info.get("tensors", [])) for info in quant["layers"].values()
        ),
        "avg_weight_bits": quant["avg_weight_bits"],
        "avg_act_bits": quant["avg_act_bits"],
        "denoiser_bytes": stored,
        "denoiser_fp16_bytes": fp16,
        "bundle_bytes": sum(info["bytes"] for info in manifest["files"].values()),
        "derived_buffers": sorted(quant.get("derived_buffers", {})),
        "bos": manifest["bos"],
        "fp_layers": _fp_layers(manifest),
        "build_metrics": manifest.get("build_metrics", {}),
        "cache": _cache_summary(manifest.get("cache") or {}),
        "sparse": _sparse_summary(manifest.get("sparsity") or {}),
        "experts": _experts(path, manifest),
    }


def _denoiser_evidence(manifest: dict[str, Any]) -> str | None:
    """How calibration found the denoiser, and the other models of the sampler loop: experts of its
    class (quantized too) and the ones left in floating point (a ControlNet), as the plan recorded
    it; None if it did not."""
    evidence = calibration_record(manifest).get("denoiser_evidence")
    return evidence if isinstance(evidence, str) else None


def _sparse_summary(sparsity: dict[str, Any]) -> dict[str, Any] | None:
    """The sparse-attention masks in brief: layers, step groups, families chosen, planned density."""
    if not sparsity:
        return None
    from diffkiln.core.sparse_plan import SparsePlan

    plan = SparsePlan.from_dict(sparsity)
    families = sorted({f for lm in plan.layers for group in lm.families for f in group})
    return {"layers": [lm.layer for lm in plan.layers], "block": plan.block, "steps": plan.steps,
            "group_starts": list(plan.group_starts), "families": families,
            "density": round(plan.density, 4)}  # fmt: skip


def _cache_summary(cache: dict[str, Any]) -> dict[str, Any] | None:
    """The cache schedule in brief: mechanism, reused blocks, per-step decisions, planned fraction."""
    if not cache:
        return None
    from diffkiln.core.cache_schedule import CacheSchedule

    schedule = CacheSchedule.from_dict(cache)
    return {
        "mechanism": schedule.mechanism.value,
        "reused_blocks": list(schedule.blocks[schedule.start : schedule.end]),
        "steps": schedule.steps,
        "schedule": schedule.pattern,
        "extrapolate": schedule.extrapolate,
        "compute_fraction": round(schedule.compute_fraction, 4),
    }


def _fp_layers(manifest: dict[str, Any]) -> dict[str, dict[str, str]]:
    """Each layer kept in FP: its reason, and its data-flow role and evidence where the plan has them."""
    plan_layers = {lp["name"]: lp for lp in manifest.get("plan", {}).get("layers", []) if isinstance(lp, dict)}
    out = {}
    for name, reason in manifest["quant"]["fp_layers"].items():
        lp = plan_layers.get(name, {})
        out[name] = {"reason": str(reason), "role": str(lp.get("role", "")), "evidence": str(lp.get("evidence", ""))}
    return out


def format_summary(summary: dict[str, Any], bundle: str | os.PathLike[str]) -> list[str]:
    """The lines ``diffkiln inspect`` prints for a :func:`summarize` result."""
    counts = ", ".join(f"{k}: {v}" for k, v in summary["layers_by_bits"].items())
    requant = f"; int8 outputs on {summary['requantized_outputs']}" if summary["requantized_outputs"] else ""
    ratio = summary["denoiser_bytes"] / max(summary["denoiser_fp16_bytes"], 1)
    bos = summary["bos"]
    bos_values = (
        f"  |BOS| {bos.get('bos_absmax'):.1f} vs others <= {bos.get('other_tokens_absmax'):.1f}"
        if bos.get("bos_absmax") and bos.get("other_tokens_absmax") is not None
        else ""
    )
    lines = [
        f"bundle   {bundle}  (format v{summary['version']}, recipe {summary['recipe']})",
        f"source   {summary['source']}",
        f"pipeline {summary['pipeline']}  denoiser={summary['denoiser']}",
        *([f"found    {summary['denoiser_evidence']}"] if summary.get("denoiser_evidence") else []),
        f"components {', '.join(summary['components'])}",
        f"layers   {counts}  (avg weight bits {summary['avg_weight_bits']:.2f}, avg act bits "
        f"{summary['avg_act_bits']:.2f}; SmoothQuant on {summary['smoothed_layers']}{requant})",
        f"sizes    denoiser {summary['denoiser_bytes'] / 1e6:.2f} MB stored (FP16 equivalent "
        f"{summary['denoiser_fp16_bytes'] / 1e6:.2f} MB, {ratio:.2f}x); bundle {summary['bundle_bytes'] / 1e6:.2f} MB",
    ]
    for name, expert in summary.get("experts", {}).items():
        bits = ", ".join(f"{k}: {v}" for k, v in expert["layers_by_bits"].items())
        lines.append(
            f"expert   {name} ({expert['class']}): {bits} (avg weight bits {expert['avg_weight_bits']:.2f}); "
            f"{expert['bytes'] / 1e6:.2f} MB stored (FP16 equivalent {expert['fp16_bytes'] / 1e6:.2f} MB)"
        )
    if summary["derived_buffers"]:
        lines.append(f"derived  {', '.join(summary['derived_buffers'])} (rebuilt from the config at load, not stored)")
    lines.append(f"bos      positions {bos['positions']}{bos_values}")
    for name, info in summary["fp_layers"].items():
        lines.append(f"fp       {name}: {info['reason']}")
    if cache := summary.get("cache"):
        reused = cache["reused_blocks"]
        span = f"{reused[0]}..{reused[-1]}" if len(reused) > 1 else reused[0]
        lines.append(
            f"cache    {cache['mechanism']} over {span}, {cache['steps']} steps {cache['schedule']} (C computes, r "
            f"reuses{', extrapolated' if cache['extrapolate'] else ''}); compute fraction "
            f"{cache['compute_fraction']:.3f}"
        )
    if sparse := summary.get("sparse"):
        lines.append(
            f"sparse   {len(sparse['layers'])} attention layers, blocks of {sparse['block']} tokens, step groups from "
            f"{sparse['group_starts']} of {sparse['steps']}; families {', '.join(sparse['families'])}; density "
            f"{sparse['density']:.3f}"
        )
    lines.append(f"build    {json.dumps(summary['build_metrics'])}")
    return lines
