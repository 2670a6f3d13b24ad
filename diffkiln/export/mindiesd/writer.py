"""The ``export --format mindiesd`` verb: a bundle's denoiser as the files MindIE-SD's
``quantize(model, quant_des_path)`` loads, unchanged (per-layer encodings: :mod:`.encode`).

Writes, into ``out`` (atomically; every file mode 0o640, the folder 0o750, as MindIE-SD's
``file_utils.check_file_safety`` requires):

* ``quant_model_weight_{algo}.safetensors`` and ``quant_model_description_{algo}.json``, ``algo``
  being ``model_quant_type`` lower-cased (the weight file name MindIE-SD derives from it); with
  ``ranks``, one pair per rank, ``..._{algo}_{rank}.*``, which MindIE-SD picks by
  ``dist.get_rank()`` when the description name ends in a rank;
* for each quantized expert beside the denoiser (Wan 2.2's ``transformer_2``), the same pair and
  its ``config.json`` in a folder named after it: ``quantize(pipe.transformer_2, "OUT/transformer_2/
  quant_model_description_w8a8.json")``;
* ``config.json`` (the denoiser's) and ``diffkiln_export.json``: what runs quantized on MindIE-SD
  and what does not, what was widened, the float dtype the files are made for, file checksums;
* ``mindiesd_cache_config.json``: the bundle's cache schedule as MindIE-SD's ``CacheConfig`` fields,
  when it has that form (:mod:`.cache`); otherwise the metadata says why not;
* ``mindiesd_sparse_attention.json`` and ``mindiesd_sparse_masks.safetensors``: the bundle's
  sparse-attention masks as MindIE-SD's ``sparse_attention`` arguments and as the exact block
  indices its ``rain_fusion_attention`` runs (:mod:`.sparse`), when the bundle has masks.

What MindIE-SD runs quantized is only the ``nn.Linear`` layers. The bundle's integer
convolutions stay float there (its quant map has no other type): the export warns, names them and
the fraction of the bundle's quantized weights they hold, and records them. MindIE-SD never
reads ``FLOAT`` tensors: the float model comes from the original checkpoint
(``from_pretrained``), and ``quantize`` swaps the Linear layers described here. The ``FLOAT``
entries (the denoiser's other tensors, convolutions dequantized) are kept for other loaders.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from diffkiln.core.atomic import atomic_directory, file_table
from diffkiln.core.cache_schedule import CacheSchedule
from diffkiln.core.schema import LoadedBundle, read_json
from diffkiln.core.sparse_plan import SparsePlan
from diffkiln.export.mindiesd.cache import mindiesd_cache_config
from diffkiln.export.mindiesd.encode import MindieExportError, encode_linear
from diffkiln.export.mindiesd.sparse import SPARSE_CONFIG_FILE, SPARSE_MASKS_FILE, mindiesd_sparse_export
from diffkiln.nn import QConv, QLinear

__all__ = ["CACHE_CONFIG_FILE", "FILE_MODE", "MindieExportConfig", "MindieFloat", "export_mindiesd"]

CACHE_CONFIG_FILE = "mindiesd_cache_config.json"
"""The bundle's cache schedule as the fields of MindIE-SD's ``CacheConfig``, when it has that form."""

log = logging.getLogger(__name__)

FILE_MODE = 0o640
"""The loosest mode MindIE-SD accepts on the description and the weights (``MODELDATA_FILE_PERMISSION``)."""
_DIR_MODE = 0o750


class MindieFloat(str, Enum):
    """The dtype the MindIE-SD model runs in (``quantize(..., dtype=...)``); it decides
    ``deq_scale``'s encoding and the input-scale rounding MindIE-SD applies."""

    FLOAT16 = "float16"
    BFLOAT16 = "bfloat16"


@dataclass(frozen=True)
class MindieExportConfig:
    """Where and how to export.

    Attributes:
        out: the folder to write.
        dtype: the dtype the model runs in on MindIE-SD; pass the same to ``quantize``. Default
            float16.
        keep_fp: write Linear layers the format cannot hold as FLOAT with a warning, instead of
            failing. Default False.
        ranks: write one description and weight file per rank, ``..._{rank}``, for a
            distributed MindIE-SD run; 0 writes one unsuffixed pair. Default 0.
        overwrite: replace an existing ``out``. Default False.
    """

    out: Path
    dtype: MindieFloat = MindieFloat.FLOAT16
    keep_fp: bool = False
    ranks: int = 0
    overwrite: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.dtype, MindieFloat):
            raise ValueError(f"dtype must be one of {[d.value for d in MindieFloat]}, got {self.dtype!r}")
        if self.ranks < 0:
            raise ValueError(f"ranks must be >= 0, got {self.ranks}")


def _float_layer_tensors(name: str, q: QLinear | QConv, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """A quantized layer written as float: dequantized weight (smoothing folded back out) and bias."""
    scale, bias = q.scale_and_bias()
    codes = q.codes_t().float() * scale  # (K, N)
    if q.smooth_inv is not None:
        codes = codes * q.smooth_inv[:, None]
    out = {f"{name}.weight": codes.t().contiguous().reshape(q.weight_shape).to(dtype)}
    if bias is not None:
        out[f"{name}.bias"] = bias.to(dtype)
    return out


def _widened(q: QLinear) -> str | None:
    notes = []
    if q.weight_bits <= 4:
        grouped = f" (x their group multipliers, groups of {q.group_size})" if q.group_size else ""
        notes.append(f"{q.weight_bits}-bit weights stored as int8 codes{grouped} (same values)")
    if not q.weight_only and not q.dynamic and q.act_grid.bits < 8:
        notes.append("7-bit activation grid written as an int8 grid of the same step (clips at 8 bits)")
    return "; ".join(notes) or None


def _model_quant_type(kinds: set[str]) -> str:
    for kind in ("W8A8_TIMESTEP", "W8A8", "W8A8_DYNAMIC", "W8A16"):
        if kind in kinds:
            return kind
    return "W8A8"


def _write(tmp: Path, algo: str, tensors: dict[str, torch.Tensor], description: dict[str, str], ranks: int) -> None:
    suffixes = [f"_{r}" for r in range(ranks)] if ranks else [""]
    first = tmp / f"quant_model_weight_{algo}{suffixes[0]}.safetensors"
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(first))
    text = json.dumps({"model_quant_type": algo.upper(), **dict(sorted(description.items()))}, indent=2) + "\n"
    for suffix in suffixes:
        weight = tmp / f"quant_model_weight_{algo}{suffix}.safetensors"
        if weight != first:
            try:  # a hard link is a regular file to MindIE-SD's symlink check, and costs no space
                os.link(first, weight)
            except OSError:
                shutil.copy2(first, weight)
        (tmp / f"quant_model_description_{algo}{suffix}.json").write_text(text)


@dataclass
class _Encoded:
    """One model's layers as MindIE-SD's files hold them, and what the export notes about them."""

    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    description: dict[str, str] = field(default_factory=dict)
    kinds: set[str] = field(default_factory=set)
    quantized: dict[str, str] = field(default_factory=dict)
    float_on_target: dict[str, str] = field(default_factory=dict)
    widened: dict[str, str] = field(default_factory=dict)
    kept: dict[str, str] = field(default_factory=dict)
    bos: list[str] = field(default_factory=list)
    share: float = 0.0
    """The fraction of the quantized weights MindIE-SD runs in float (the convolutions')."""

    def meta(self) -> dict[str, Any]:
        """The metadata entries (``diffkiln_export.json``) of this model."""
        return {"quantized_on_target": self.quantized, "float_on_target": self.float_on_target,
                "quantized_weight_fraction_float_on_target": round(self.share, 4),
                "bos_rows_not_applied": self.bos, "widened": self.widened, "kept_fp": self.kept}  # fmt: skip


def _encode_model(denoiser: nn.Module, dtype: torch.dtype, keep_fp: bool) -> _Encoded:
    """Every layer of ``denoiser``: Linear layers encoded, convolutions and the rest FLOAT.

    Raises:
        MindieExportError: a Linear layer the format cannot hold, without ``keep_fp``.
    """
    out = _Encoded()
    q_params = {"total": 0, "float_on_target": 0}
    for name, module in denoiser.named_modules():
        if not isinstance(module, (QLinear, QConv)):
            continue
        q_params["total"] += module.in_flat * module.weight_shape[0]
        if isinstance(module, QConv):
            out.float_on_target[name] = f"{type(module).__name__[1:]}: MindIE-SD quantizes nn.Linear only"
            q_params["float_on_target"] += module.in_flat * module.weight_shape[0]
            layer = _float_layer_tensors(name, module, dtype)
            out.tensors.update(layer)
            out.description.update({k: "FLOAT" for k in layer})
            continue
        try:
            enc = encode_linear(name, module, dtype)
        except MindieExportError as exc:
            if not keep_fp:
                raise
            out.kept[name] = str(exc).split(": ", 1)[-1]
            log.warning("writing %s as FLOAT: %s", name, out.kept[name])
            layer = _float_layer_tensors(name, module, dtype)
            out.tensors.update(layer)
            out.description.update({k: "FLOAT" for k in layer})
            continue
        out.tensors.update(enc.tensors)
        out.description.update(enc.description)
        out.kinds.add(enc.kind)
        out.quantized[name] = enc.kind
        if (note := _widened(module)) is not None:
            out.widened[name] = note
        if module.bos_rows is not None:
            out.bos.append(name)
    q_names = {n for n, m in denoiser.named_modules() if isinstance(m, (QLinear, QConv))}
    for key, t in [*denoiser.named_parameters(), *denoiser.named_buffers()]:
        if key.rpartition(".")[0] in q_names:
            continue
        out.tensors[key] = t.detach().to(dtype) if t.is_floating_point() else t.detach()
        out.description[key] = "FLOAT"
    out.share = q_params["float_on_target"] / max(q_params["total"], 1)
    if out.float_on_target:
        log.warning(
            "%d quantized layers (%.0f%% of the bundle's quantized weights) are convolutions, which MindIE-SD "
            "runs in float: %s. Build with `diffkiln optimize --target mindiesd` so the plan (and its report) "
            "is what MindIE-SD runs.", len(out.float_on_target), 100 * out.share,
            ", ".join(sorted(out.float_on_target)[:8]),
        )  # fmt: skip
    if out.bos:
        log.warning("%d layers have BOS rows, which MindIE-SD does not apply (it quantizes those rows too)",
                    len(out.bos))  # fmt: skip
    return out


def _write_config(source: Path, dest: Path) -> None:
    """A denoiser's diffusers config, without the bundle's guard against plain diffusers."""
    config = read_json(source)
    config.pop("quantization_config", None)
    dest.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def export_mindiesd(bundle: LoadedBundle, config: MindieExportConfig) -> Path:
    """Write a loaded bundle's denoiser in the msModelSlim / MindIE-SD format (see the module docstring).

    Returns:
        The output folder.

    Raises:
        BundleError: ``out`` exists without ``overwrite``.
        MindieExportError: a Linear layer the format cannot hold, without ``keep_fp``.
    """
    path, manifest = bundle.path, bundle.manifest
    dtype = getattr(torch, config.dtype.value)
    denoiser_name = manifest["pipeline"]["denoiser"]
    # The experts of the denoiser's class (Wan 2.2's transformer_2): MindIE-SD's ``quantize`` takes
    # one model and its description, so each gets its own pair, in a folder named after it.
    encoded = {name: _encode_model(model, dtype, config.keep_fp)
               for name, model in {denoiser_name: bundle.denoiser, **bundle.experts}.items()}  # fmt: skip
    main = encoded[denoiser_name]
    algo = _model_quant_type(main.kinds).lower()
    cache_meta: dict[str, Any] | None = None
    cache_config: dict[str, Any] | None = None
    if manifest.get("cache"):
        cache_config, why = mindiesd_cache_config(CacheSchedule.from_dict(manifest["cache"]))
        cache_meta = {"expressible": cache_config is not None, "note": why}
        if cache_config is None:
            log.warning("the bundle's cache schedule cannot be expressed as MindIE-SD's CacheConfig: %s", why)
    sparse_config, sparse_tensors = (mindiesd_sparse_export(SparsePlan.from_dict(manifest["sparsity"]))
                                     if manifest.get("sparsity") else (None, {}))  # fmt: skip
    with atomic_directory(Path(config.out), config.overwrite) as tmp:
        _write(tmp, algo, main.tensors, main.description, config.ranks)
        if sparse_config is not None:
            (tmp / SPARSE_CONFIG_FILE).write_text(json.dumps(sparse_config, indent=2) + "\n")
            save_file(sparse_tensors, str(tmp / SPARSE_MASKS_FILE))
        _write_config(path / denoiser_name / "config.json", tmp / "config.json")
        experts: dict[str, Any] = {}
        for name in sorted(bundle.experts):
            enc, folder = encoded[name], tmp / name
            folder.mkdir()
            expert_algo = _model_quant_type(enc.kinds).lower()
            _write(folder, expert_algo, enc.tensors, enc.description, config.ranks)
            _write_config(path / name / "config.json", folder / "config.json")
            experts[name] = {"folder": name, "model_quant_type": expert_algo.upper(), **enc.meta()}
        if cache_config is not None:
            (tmp / CACHE_CONFIG_FILE).write_text(json.dumps(cache_config, indent=2) + "\n")
        meta: dict[str, Any] = {
            "format": "diffkiln.mindiesd",
            "version": 4 if experts else 3,  # 4: experts, each in its own folder
            "model_quant_type": algo.upper(),
            "denoiser_class": manifest["pipeline"]["denoiser_class"],
            "dtype": config.dtype.value,
            "ranks": config.ranks,
            **main.meta(),
            "requires_original_checkpoint": True,
            "cache": cache_meta,
            "sparse_attention": None if sparse_config is None else {
                key: sparse_config[key] for key in ("rain_fusion_attention", "sparse_attention", "masked_density",
                                                    "masked_density_at_128")},
            "bundle": {"source": manifest["source"], "recipe": manifest["quant"]["recipe"]},
        }  # fmt: skip
        if experts:
            meta["experts"] = experts
        meta["files"] = file_table(tmp)
        (tmp / "diffkiln_export.json").write_text(json.dumps(meta, indent=2) + "\n")
        for f in tmp.rglob("*"):
            f.chmod(_DIR_MODE if f.is_dir() else FILE_MODE)
        tmp.chmod(_DIR_MODE)
    return Path(config.out)
