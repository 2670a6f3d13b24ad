"""A bundle's summary for ``diffkiln inspect``: read from the verified manifest and file sizes."""

from __future__ import annotations

import math
import os
from collections import Counter
from pathlib import Path
from typing import Any

from safetensors import safe_open

from diffkiln.core.schema import read_manifest, verify_files

__all__ = ["denoiser_sizes", "summarize"]

_BYTES = {"I8": 1, "U8": 1, "I32": 4, "I64": 8, "F32": 4, "F16": 2, "BF16": 2, "F64": 8, "BOOL": 1}


def denoiser_sizes(bundle: Path, manifest: dict[str, Any]) -> tuple[int, int]:
    """(stored denoiser bytes, the same denoiser's FP16 bytes).

    Stored bytes count every tensor the denoiser keeps (int8 and packed weights, scales, BOS rows, FP
    tensors); the FP16 figure counts 2 bytes per element of the original float model: quantized
    weights and biases at their float shapes, every FP tensor, and the derived buffers an FP16
    checkpoint holds (persistent ones; the bundle rebuilds them instead of storing them).
    """
    stored = fp16 = 0
    layers = manifest["quant"]["layers"]
    with safe_open(str(bundle / manifest["quant"]["weights_file"]), "pt") as f:
        for key in f.keys():  # noqa: SIM118 - safe_open is not a mapping
            sl = f.get_slice(key)
            stored += math.prod(sl.get_shape()) * _BYTES.get(sl.get_dtype(), 4)
            layer, _, suffix = key.partition("::")
            if key.startswith("fp::") or suffix in ("weight_q", "bias"):
                fp16 += math.prod(sl.get_shape()) * 2
            elif suffix == "weight_packed":  # the float weight's shape is in the layer's meta
                fp16 += math.prod(layers[layer]["meta"]["weight_shape"]) * 2
    for record in manifest["quant"].get("derived_buffers", {}).values():  # format version 4
        if record["persistent"]:
            fp16 += math.prod(record["shape"]) * 2
    return stored, fp16


def summarize(bundle: str | os.PathLike[str]) -> dict[str, Any]:
    """Verify a bundle and summarize it: components, layer counts by bit-width, sizes, BOS, build metrics.

    Raises:
        BundleError: the bundle fails its checks.
    """
    path = Path(bundle)
    manifest = read_manifest(path)
    verify_files(path, manifest)
    quant = manifest["quant"]
    bits = Counter(f"W{info['bits']}A{info['act']['bits'] if info['act'] else 16}" for info in quant["layers"].values())
    bits["FP"] = len(quant["fp_layers"])
    stored, fp16 = denoiser_sizes(path, manifest)
    return {
        "version": manifest["version"],
        "recipe": quant["recipe"],
        "source": manifest["source"],
        "pipeline": manifest["pipeline"]["class"],
        "denoiser": manifest["pipeline"]["denoiser_class"],
        "components": manifest["pipeline"]["components"],
        "layers_by_bits": dict(bits),
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
        "build_metrics": manifest.get("build_metrics", {}),
    }
