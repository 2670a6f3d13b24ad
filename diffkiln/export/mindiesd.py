"""The ``export --format mindiesd`` verb: a bundle's denoiser in the msModelSlim format that
MindIE-SD's ``quantize(model, quant_des_path)`` loads.

Writes, into ``out`` (atomically):

* ``quant_model_weight_{algo}.safetensors``: for each quantized layer ``L``
  - static W8A8: ``L.weight`` int8 (the layer's weight shape), ``L.quant_bias`` int32 (N,),
    ``L.input_scale`` and ``L.input_offset`` (1,) in the float dtype, ``L.deq_scale`` float32 (N,);
  - dynamic W8A8 and weight-only (W8A16): ``L.weight`` int8, ``L.weight_scale`` and
    ``L.weight_offset`` float32 (N,) (zeros: the weights are symmetric);
  - SmoothQuant factors, where the layer has them: ``L.div.mul_scale`` float32 (K,), multiplied
    into the activation before quantizing it;
  and every other denoiser tensor under its own name, in the float dtype;
* ``quant_model_description_{algo}.json``: ``{"model_quant_type": ..., tensor name: type}`` with
  types ``W8A8``, ``W8A8_DYNAMIC``, ``W8A16`` and ``FLOAT``;
* ``config.json`` (the denoiser's) and ``diffkiln_export.json`` (what was widened or dropped,
  file checksums).

``algo`` is ``w8a8``, or ``w8a8_dynamic`` when every activation-quantized layer is dynamic.

The static formulas (msModelSlim's): ``xq = clamp(round(x / input_scale + input_offset))``,
``acc = xq @ weight.T + quant_bias`` (int32), ``y = acc * deq_scale``; so
``deq_scale = input_scale * weight_scale`` and
``quant_bias = round(bias / deq_scale) - input_offset * weight.sum(1)``.

What the format cannot hold, and what the exporter does then (also in docs/mindiesd-export.md):

* 4- and 2-bit weights (mixed plans): written as int8 codes, the same values, so the results do
  not change but the size gain is lost; listed under ``widened`` in ``diffkiln_export.json``;
* 7-bit activation grids: written as int8 grids of the same step, so activations beyond the
  calibrated range clip at 8 bits (codes +-128) instead of 7 (+-64): values inside the range are
  unchanged, outliers are kept more faithfully than by the bundle; listed under ``widened``;
* BOS rows: MindIE-SD's layers have no slot for them; written as ``L.bos_rows`` /
  ``L.bos_positions`` (FLOAT) for loaders that apply them, listed under ``bos``; a loader that
  ignores them quantizes those positions like the other tokens;
* requantized convolution outputs (``--requantize-conv-outputs``): MindIE-SD's layers have no
  output quantization; written as ``L.output_scale`` / ``L.output_offset`` (1,) (FLOAT) for
  loaders that apply them (``y = (clamp(round(y / output_scale + output_offset), -128, 127) -
  output_offset) * output_scale``), listed under ``requantized_outputs``; a loader that ignores them keeps the
  output in float, one rounding closer to the FP model than the bundle;
* timestep-aware activation ranges: not written; the export fails naming the layer, or with
  ``keep_fp`` the layer is written ``FLOAT`` (dequantized weights) and listed under ``kept_fp``.
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from diffkiln.core.schema import LoadedBundle
from diffkiln.export.atomic import atomic_directory, file_table
from diffkiln.nn import QConv, QLinear

__all__ = ["MindieExportConfig", "MindieExportError", "MindieFloat", "export_mindiesd"]

log = logging.getLogger(__name__)


class MindieExportError(ValueError):
    """A layer cannot be written in the msModelSlim format; the message names it and why."""


class MindieFloat(str, Enum):
    """The float dtype of input scales/offsets and FLOAT tensors."""

    FLOAT16 = "float16"
    BFLOAT16 = "bfloat16"


@dataclass(frozen=True)
class MindieExportConfig:
    """Where and how to export.

    Attributes:
        out: the folder to write.
        dtype: float dtype of ``input_scale``/``input_offset`` and FLOAT tensors (msModelSlim
            writes the model's dtype). Default float16.
        keep_fp: write layers the format cannot hold as FLOAT (dequantized weights) with a
            warning, instead of failing. Default False.
        overwrite: replace an existing ``out``. Default False.
    """

    out: Path
    dtype: MindieFloat = MindieFloat.FLOAT16
    keep_fp: bool = False
    overwrite: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.dtype, MindieFloat):
            raise ValueError(f"dtype must be one of {[d.value for d in MindieFloat]}, got {self.dtype!r}")


def _layer_type(q: QLinear | QConv) -> str:
    if q.weight_only:
        return "W8A16"
    return "W8A8_DYNAMIC" if q.dynamic else "W8A8"


def _weight_codes(q: QLinear | QConv) -> torch.Tensor:
    """int8 codes in the layer's own weight shape (N, K) or (O, I, kh, kw)."""
    return q.codes_t().t().contiguous().reshape(q.weight_shape)


def _layer_tensors(name: str, q: QLinear | QConv, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    weight = _weight_codes(q)
    scale, bias = q.scale_and_bias()
    out: dict[str, torch.Tensor] = {f"{name}.weight": weight}
    if q.weight_only or q.dynamic:
        out[f"{name}.weight_scale"] = scale.float()
        out[f"{name}.weight_offset"] = torch.zeros_like(scale, dtype=torch.float32)
        if bias is not None:
            out[f"{name}.bias"] = bias.to(dtype)
    else:
        grid = q.act_grid
        # input_scale is stored in the model's float dtype: derive deq_scale from the stored value
        # so that quantization and dequantization use the same step.
        input_scale = torch.tensor([grid.scale], dtype=dtype)
        deq = (float(input_scale.item()) * scale.double()).float()
        w_sum = weight.reshape(weight.shape[0], -1).to(torch.int64).sum(1)
        qbias = torch.zeros_like(w_sum) if bias is None else torch.round(bias.double() / deq.double()).to(torch.int64)
        qbias = qbias - grid.zero_point * w_sum
        if qbias.abs().max() >= 2**31:
            raise MindieExportError(f"{name}: quant_bias overflows int32 (bias too large for the accumulator scale)")
        out[f"{name}.quant_bias"] = qbias.to(torch.int32)
        out[f"{name}.input_scale"] = input_scale
        out[f"{name}.input_offset"] = torch.tensor([float(grid.zero_point)], dtype=dtype)
        out[f"{name}.deq_scale"] = deq
    if q.smooth_inv is not None:
        # float32: rounding the factors to float16 moves activations across code boundaries
        # (measured 25 dB instead of 38 dB per call on shapes-unet with SmoothQuant everywhere).
        out[f"{name}.div.mul_scale"] = q.smooth_inv.to(torch.float32)
    if isinstance(q, QLinear) and q.bos_rows is not None and q.bos_positions is not None:
        out[f"{name}.bos_rows"] = q.bos_rows.to(dtype)
        out[f"{name}.bos_positions"] = q.bos_positions.to(torch.int64)
    return out


def _float_layer_tensors(name: str, q: QLinear | QConv, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """A layer kept in float: dequantized weight (smoothing folded back out) and bias."""
    scale, bias = q.scale_and_bias()
    codes = q.codes_t().float() * scale  # (K, N)
    if q.smooth_inv is not None:
        codes = codes * q.smooth_inv[:, None]
    out = {f"{name}.weight": codes.t().contiguous().reshape(q.weight_shape).to(dtype)}
    if bias is not None:
        out[f"{name}.bias"] = bias.to(dtype)
    return out


def export_mindiesd(bundle: LoadedBundle, config: MindieExportConfig) -> Path:
    """Write a loaded bundle's denoiser in the msModelSlim / MindIE-SD format (see the module docstring).

    Returns:
        The output folder.

    Raises:
        BundleError: ``out`` exists without ``overwrite``.
        MindieExportError: a layer the format cannot hold, without ``keep_fp``.
    """
    path, manifest, denoiser = bundle.path, bundle.manifest, bundle.denoiser  # only the denoiser is exported
    dtype = getattr(torch, config.dtype.value)
    tensors: dict[str, torch.Tensor] = {}
    description: dict[str, str] = {}
    widened: dict[str, str] = {}
    kept: dict[str, str] = {}
    bos: list[str] = []
    requantized: list[str] = []
    q_names: set[str] = set()
    act_types: set[str] = set()
    for name, module in denoiser.named_modules():
        if not isinstance(module, (QLinear, QConv)):
            continue
        q_names.add(name)
        if module.act_timesteps is not None:
            reason = "timestep-aware activation ranges are not written to the msModelSlim format yet"
            if not config.keep_fp:
                raise MindieExportError(f"{name}: {reason}; rebuild without them, or pass --keep-fp")
            log.warning("writing %s as FLOAT: %s", name, reason)
            kept[name] = reason
            layer = _float_layer_tensors(name, module, dtype)
            description.update({k: "FLOAT" for k in layer})
            tensors.update(layer)
            continue
        layer = _layer_tensors(name, module, dtype)
        kind = _layer_type(module)
        if not module.weight_only:
            act_types.add(kind)
        if module.weight_bits <= 4:
            grouped = f" (x their group multipliers, groups of {module.group_size})" if module.group_size else ""
            widened[name] = f"{module.weight_bits}-bit weights stored as int8 codes{grouped} (same values)"
        if not module.weight_only and not module.dynamic and module.act_grid.bits < 8:
            note = "7-bit activation grid written as an int8 grid of the same step (clips at 8 bits)"
            widened[name] = f"{widened[name]}; {note}" if name in widened else note
        if f"{name}.bos_rows" in layer:
            bos.append(name)
        if isinstance(module, QConv) and module.output_grid is not None:
            layer[f"{name}.output_scale"] = torch.tensor([module.output_grid.scale], dtype=torch.float32)
            layer[f"{name}.output_offset"] = torch.tensor([float(module.output_grid.zero_point)], dtype=torch.float32)
            requantized.append(name)
        for key in layer:
            extra = (".bos_rows", ".bos_positions", ".output_scale", ".output_offset")
            description[key] = "FLOAT" if key.endswith(extra) else kind
        tensors.update(layer)
    for key, t in [*denoiser.named_parameters(), *denoiser.named_buffers()]:
        if key.rpartition(".")[0] in q_names:
            continue
        tensors[key] = t.detach().to(dtype) if t.is_floating_point() else t.detach()
        description[key] = "FLOAT"
    algo = "w8a8_dynamic" if act_types == {"W8A8_DYNAMIC"} else "w8a8"
    description = {"model_quant_type": algo.upper(), **dict(sorted(description.items()))}
    with atomic_directory(Path(config.out), config.overwrite) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp / f"quant_model_weight_{algo}.safetensors"))
        (tmp / f"quant_model_description_{algo}.json").write_text(json.dumps(description, indent=2) + "\n")
        shutil.copy2(path / manifest["pipeline"]["denoiser"] / "config.json", tmp / "config.json")
        meta: dict[str, Any] = {
            "format": "diffkiln.mindiesd",
            "version": 1,
            "algo": algo,
            "denoiser_class": manifest["pipeline"]["denoiser_class"],
            "float_dtype": config.dtype.value,
            "widened": widened,
            "kept_fp": kept,
            "bos": bos,
            "requantized_outputs": requantized,
            "bundle": {"source": manifest["source"], "recipe": manifest["quant"]["recipe"]},
        }
        meta["files"] = file_table(tmp)
        (tmp / "diffkiln_export.json").write_text(json.dumps(meta, indent=2) + "\n")
    return Path(config.out)
