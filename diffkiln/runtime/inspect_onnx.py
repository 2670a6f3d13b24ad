"""``diffkiln inspect`` of an ONNX export folder: its graphs, opset, the checks each graph passed at
export, the bundle it came from, and sizes. Verified as onnxruntime loads it (strict manifest
schema, every file's size and digest)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from diffkiln.runtime.onnxruntime_backend import read_onnx_manifest

__all__ = ["format_onnx_summary", "summarize_onnx"]


def summarize_onnx(folder: str | os.PathLike[str]) -> dict[str, Any]:
    """Verify an ONNX export and summarize it.

    Raises:
        BundleError: the folder fails its checks.
    """
    path = Path(folder)
    manifest = read_onnx_manifest(path)
    graphs = {}
    for name, entry in manifest["components"].items():
        check = entry.get("check") or {}
        graphs[name] = {
            "kind": entry["kind"],
            "file": entry["file"],
            "bytes": (path / entry["file"]).stat().st_size,
            "dynamic_axes": entry.get("dynamic_axes") or {},
            "check_sqnr_db": check.get("sqnr_db"),
            "outputs": [field for field, _ in entry["output_fields"]] if entry["kind"] == "denoiser" else [],
            "variants": [_variant(path, entry, variant) for variant in entry.get("variants") or []],
        }
    return {
        "kind": "onnx",
        "version": manifest["version"],
        "opset": manifest["opset"],
        "compute": manifest["compute"],
        "matmulnbits": manifest.get("matmulnbits", False),
        "recipe": manifest["bundle"]["recipe"],
        "source": manifest["bundle"]["source"],
        "pipeline": manifest["pipeline"]["class"],
        "denoiser": manifest["pipeline"]["denoiser"],
        "graphs": graphs,
        "skipped_components": manifest.get("skipped_components") or {},
        "kept_fp": manifest.get("kept_fp") or {},
        "cache": bool(manifest.get("cache")),
        "cache_graph": manifest.get("cache_graph") is not None,
        "export_bytes": sum((path / f).stat().st_size for f in manifest["files"]),
    }


def _variant(path: Path, entry: dict[str, Any], variant: dict[str, Any]) -> dict[str, Any]:
    """A denoiser's graph for a further form of its calls: its file, the options that tell its
    calls apart from the first form's, and its export check."""
    options = {**{k: None for k in entry["options"]}, **variant["options"]}
    return {
        "file": variant["file"],
        "bytes": (path / variant["file"]).stat().st_size,
        "options": {k: v for k, v in options.items() if entry["options"].get(k) != v},
        "check_sqnr_db": (variant.get("check") or {}).get("sqnr_db"),
    }


def format_onnx_summary(summary: dict[str, Any], folder: str | os.PathLike[str]) -> list[str]:
    """The lines ``diffkiln inspect`` prints for a :func:`summarize_onnx` result."""
    lines = [
        f"onnx     {folder}  (ONNX export v{summary['version']}, opset {summary['opset']}, {summary['compute']} "
        f"compute{', MatMulNBits' if summary['matmulnbits'] else ''}; runs in onnxruntime)",
        f"source   {summary['source']}  (bundle recipe {summary['recipe']})",
        f"pipeline {summary['pipeline']}  denoiser={summary['denoiser']}",
    ]
    for name, g in summary["graphs"].items():
        check = f"; export check {g['check_sqnr_db']:.1f} dB vs torch" if g["check_sqnr_db"] is not None else ""
        dynamic = ", ".join(f"{k}{v}" for k, v in g["dynamic_axes"].items() if v) or "static"
        lines.append(f"graph    {name} ({g['kind']}): {g['file']} {g['bytes'] / 1e6:.2f} MB; dynamic {dynamic}{check}")
        if len(g["outputs"]) > 1:
            lines.append(f"outputs  {name}: {', '.join(g['outputs'])} (a prediction each)")
        for variant in g["variants"]:
            calls = ", ".join(f"{key}={value!r}" for key, value in variant["options"].items())
            db = variant["check_sqnr_db"]
            check = f"; export check {db:.1f} dB vs torch" if db is not None else ""
            lines.append(f"variant  {name}: {variant['file']} {variant['bytes'] / 1e6:.2f} MB; for its calls with "
                         f"{calls}{check}")  # fmt: skip
    for name, reason in summary["skipped_components"].items():
        lines.append(f"skipped  {name}: {reason}")
    if summary["kept_fp"]:
        lines.append(
            f"fp       {len(summary['kept_fp'])} layers kept in float: {', '.join(sorted(summary['kept_fp']))}"
        )
    if summary["cache"]:
        graph = "denoiser_cached.onnx for reused steps" if summary["cache_graph"] else "the denoiser graph"
        lines.append(f"cache    the bundle's frozen cache schedule, on {graph}")
    lines.append(f"sizes    export {summary['export_bytes'] / 1e6:.2f} MB")
    return lines
