"""The ``export`` verb: freeze a pipeline and its Plan into a self-contained bundle directory.

Layout (see docs/bundle-format.md)::

    BUNDLE/manifest.json                     contract: format, version, quant spec, checksums
    BUNDLE/model_index.json                  the diffusers pipeline index
    BUNDLE/<denoiser>/config.json            the denoiser's diffusers config
    BUNDLE/<denoiser>/quantized.safetensors  int8 and packed int4/int2 weights, scales, activation
                                             params, BOS rows, and the FP tensors of the rest (but
                                             the buffers its constructor rebuilds exactly)
    BUNDLE/<expert>/...                      the same for each quantized expert (Wan 2.2's transformer_2)
    BUNDLE/<component>/...                   text encoders, VAE, tokenizers, scheduler (save_pretrained)

Written atomically: everything goes to a temporary sibling directory that is renamed into place
last, so an interrupted export leaves nothing that loads.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any, cast

import torch
from safetensors.torch import save_file
from torch import nn
from tqdm.auto import tqdm

from diffkiln.calibrate.stats import CalibrationStats
from diffkiln.core.atomic import atomic_directory, file_table
from diffkiln.core.errors import InvalidInputError
from diffkiln.core.layers import find_quantizable_layers
from diffkiln.core.packing import PACKABLE_BITS
from diffkiln.core.pipelines import find_denoiser
from diffkiln.core.plan import Plan
from diffkiln.core.schema import BUNDLE_FORMAT, MANIFEST_NAME, PLAIN_DIFFUSERS_GUARD
from diffkiln.core.tokenizer_print import tokenizer_prints
from diffkiln.core.toolchain import toolchain_versions
from diffkiln.export.derived import find_derived_buffers
from diffkiln.nn.freeze import freeze_layer, layer_meta

__all__ = ["ExportConfig", "FloatStorage", "export_bundle"]

QUANT_FILE = "quantized.safetensors"
MODULE_FOLDER = "module"
"""Where a module bundle keeps its one module's tensors."""


class FloatStorage(str, Enum):
    """How the denoiser's remaining float tensors (biases, norms, FP layers, BOS rows) are stored."""

    LOSSLESS = "lossless"  # float16 where every value is exact in float16, else float32
    FLOAT16 = "float16"  # always float16, as an FP16 checkpoint stores them (mixed precision)


@dataclass(frozen=True)
class ExportConfig:
    """Where and how to write a bundle.

    Attributes:
        out: the bundle directory to create.
        overwrite: replace an existing directory. Default False (an existing one is an error).
        float_storage: LOSSLESS keeps every float tensor exact; FLOAT16 rounds them to float16
            like an FP16 checkpoint (the runtime computes in float32 either way). Default LOSSLESS.
        progress: show a ``freeze`` progress bar over the quantized layers. Default False.
    """

    out: Path
    overwrite: bool = False
    float_storage: FloatStorage = FloatStorage.LOSSLESS
    progress: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.float_storage, FloatStorage):
            raise ValueError(
                f"float_storage must be one of {[e.value for e in FloatStorage]}, got {self.float_storage!r}"
            )


def _denoiser_name(pipe: Any, denoiser: nn.Module) -> str:
    for name, comp in pipe.components.items():
        if comp is denoiser:
            return str(name)
    raise ValueError("the denoiser is not a component of the pipeline")


def _stored_float(t: torch.Tensor, storage: FloatStorage) -> torch.Tensor:
    """A float32 tensor as stored: FP16 when lossless (a checkpoint shipped in FP16 and loaded as
    FP32: half the bytes, bit-exact), or always FP16 under FLOAT16. The runtime casts back."""
    if t.dtype != torch.float32:
        return t
    if storage is FloatStorage.FLOAT16 or torch.equal(t.half().float(), t):
        return t.half()
    return t


_FLOAT_SUFFIXES = ("bias", "bos_rows")  # per-layer float tensors that follow float_storage


def _write_denoiser(
    model: Any, plan: Plan, stats: CalibrationStats, folder: Path, storage: FloatStorage, progress: bool = False
) -> tuple[str, dict[str, Any]]:
    denoiser = find_denoiser(model, plan.denoiser or None)
    name = MODULE_FOLDER if isinstance(model, nn.Module) else _denoiser_name(model, denoiser)
    layers = find_quantizable_layers(denoiser)
    (folder / name).mkdir(parents=True)
    if callable(getattr(denoiser, "save_config", None)):
        cast(Any, denoiser).save_config(folder / name)  # a diffusers ModelMixin: the runtime rebuilds it
        config_file = folder / name / "config.json"
        config = json.loads(config_file.read_text())
        config["quantization_config"] = PLAIN_DIFFUSERS_GUARD  # plain diffusers refuses it, naming diffkiln
        config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    tensors: dict[str, torch.Tensor] = {}
    quant_layers: dict[str, Any] = {}
    quantized_params: set[str] = set()
    quantized = [lp for lp in plan.layers if lp.quantized]
    with tqdm(quantized, desc="freeze: packing weights", unit="layer", disable=not progress) as bar:
        for lp in bar:
            module = layers[lp.name]
            frozen = freeze_layer(module, lp, stats.layers.get(lp.name))
            for suffix, t in frozen.items():
                if suffix in _FLOAT_SUFFIXES:
                    t = _stored_float(t, storage)  # the runtime casts it back to float32
                tensors[f"{lp.name}::{suffix}"] = t.contiguous()
            quantized_params.update(f"{lp.name}.{p}" for p, _ in module.named_parameters(recurse=False))
            quant_layers[lp.name] = {
                "bits": lp.weight.bits if lp.weight else 16,
                "granularity": lp.weight.granularity if lp.weight else None,
                # None: one scale per output channel; else two-level groups of this many inputs.
                "group_size": lp.weight.group_size if lp.weight else None,
                "symmetric": lp.weight.symmetric if lp.weight else None,
                "packed": bool(lp.weight and lp.weight.bits in PACKABLE_BITS),
                "scale_dtype": lp.weight.scale_dtype if lp.weight else None,
                "act": {"bits": lp.act.bits, "mode": lp.act.mode.value} if lp.act else None,
                "tensors": sorted(f"{lp.name}::{s}" for s in frozen),
                "meta": layer_meta(module, lp),
                "bos_positions": list(lp.bos_positions),
            }
    # Everything else of the denoiser: FP layers, norms, embeddings, and the buffers its
    # constructor does not rebuild exactly (the runtime rebuilds and checks the derived ones).
    derived = find_derived_buffers(denoiser)
    fp_names = []
    for pname, t in [*denoiser.named_parameters(), *denoiser.named_buffers()]:
        if pname in quantized_params or pname in derived:
            continue
        tensors[f"fp::{pname}"] = _stored_float(t.detach().cpu(), storage).contiguous()
        fp_names.append(pname)
    save_file(tensors, str(folder / name / QUANT_FILE), metadata={"format": BUNDLE_FORMAT})
    fp_layers = {lp.name: lp.reason for lp in plan.layers if not lp.quantized}
    return name, {
        "layers": quant_layers,
        "fp_layers": fp_layers,
        "fp_tensors": len(fp_names),
        "derived_buffers": {n: d.to_dict() for n, d in sorted(derived.items())},
        "denoiser_class": type(denoiser).__name__,
        "weights_file": f"{name}/{QUANT_FILE}",
    }


def _quant_section(plan: Plan, quant: dict[str, Any], storage: FloatStorage) -> dict[str, Any]:
    """A denoiser's ``quant`` section: its recipe, weights file, layers and average bits."""
    return {
        "recipe": plan.recipe,
        "weights_file": quant["weights_file"],
        "layers": quant["layers"],
        "fp_layers": quant["fp_layers"],
        "derived_buffers": quant["derived_buffers"],
        "avg_weight_bits": plan.avg_weight_bits,
        "avg_stored_weight_bits": _stored_bits_or_none(plan),
        "avg_act_bits": plan.avg_act_bits,
        "simulated": False,
        "float_storage": storage.value,
    }


def _format_version(plan: Plan, derived_buffers: dict[str, Any], module: bool, experts: bool = False) -> int:
    """The lowest bundle format version that describes the bundle: 9 with quantized experts, 8 with
    sparse-attention masks, 7 with a cache schedule, 6 for a
    module bundle or 1-D/3-D convolutions, 5 with requantized outputs, 4 with derived buffers, 3
    with 3-bit layers, else 2."""
    if experts:
        return 9
    if plan.sparse is not None:
        return 8
    if plan.cache is not None:
        return 7
    if module or any(lp.quantized and lp.kind in ("conv1d", "conv3d") for lp in plan.layers):
        return 6
    if any(lp.output is not None for lp in plan.layers):
        return 5
    if derived_buffers:
        return 4
    three_bit = any(lp.weight is not None and lp.weight.bits == 3 for lp in plan.layers)
    return 3 if three_bit else 2


def export_bundle(
    model: Any,
    plan: Plan,
    stats: CalibrationStats,
    config: ExportConfig,
    build_metrics: dict[str, Any] | None = None,
    experts: Sequence[tuple[Plan, CalibrationStats]] = (),
) -> Path:
    """Write the bundle for ``pipe`` quantised by ``plan``.

    Args:
        model: the FP pipeline (its other components are copied as they are), or a bare module
            (the bundle then holds that module alone: ``diffkiln.runtime.load_into`` puts it back
            into the user's own model object).
        plan: the quantisation plan.
        stats: the calibration statistics the plan was made from (for BOS rows).
        config: destination and overwrite policy.
        build_metrics: figures measured while building, recorded in the manifest.
        experts: for each other component of the denoiser's class that the sampler runs (Wan 2.2's
            ``transformer_2``), its plan (``plan.denoiser`` names it) and the calibration it was
            made from; stored quantized as the denoiser is (bundle version 9). Default none.

    Returns:
        The bundle directory.

    Raises:
        BundleError: the destination exists and ``overwrite`` is False.
    """
    out = Path(config.out)
    module = isinstance(model, nn.Module)
    with atomic_directory(out, config.overwrite) as tmp:
        denoiser_name, quant = _write_denoiser(model, plan, stats, tmp, config.float_storage, config.progress)
        expert_sections: dict[str, Any] = {}
        for expert_plan, expert_stats in experts:
            if module or not expert_plan.denoiser or expert_plan.denoiser == denoiser_name:
                raise InvalidInputError(f"an expert's plan must name a pipeline component besides the denoiser "
                                        f"{denoiser_name!r}; it names {expert_plan.denoiser!r}")
            name, expert_quant = _write_denoiser(model, expert_plan, expert_stats, tmp, config.float_storage,
                                                 config.progress)  # fmt: skip
            expert_sections[name] = {
                "denoiser_class": expert_quant["denoiser_class"],
                "quant": _quant_section(expert_plan, expert_quant, config.float_storage),
                "plan": expert_plan.to_dict(),
                "bos": {"positions": list(expert_plan.bos_positions), **expert_plan.notes.get("bos", {})},
            }
        if not module:
            for name, comp in model.components.items():
                if comp is None or name == denoiser_name or name in expert_sections:
                    continue
                if not hasattr(comp, "save_pretrained"):
                    continue
                comp.save_pretrained(tmp / name)
            model.save_config(tmp)  # model_index.json
        files = file_table(tmp)
        manifest: dict[str, Any] = {
            "format": BUNDLE_FORMAT,
            "version": _format_version(plan, quant["derived_buffers"], module, bool(expert_sections)),
            "kind": "module" if module else "pipeline",
            "source": plan.source,
            "pipeline": {
                "class": None if module else type(model).__name__,
                "denoiser": denoiser_name,
                "denoiser_class": quant["denoiser_class"],
                "components": [] if module else sorted(n for n, c in model.components.items() if c is not None),
            },
            "quant": _quant_section(plan, quant, config.float_storage),
            "bos": {"positions": list(plan.bos_positions), **plan.notes.get("bos", {})},
            "plan": plan.to_dict(),
            "sparsity": plan.sparse.to_dict() if plan.sparse is not None else {},
            "cache": plan.cache.to_dict() if plan.cache is not None else {},
            "toolchain": toolchain_versions(),
            "build_metrics": build_metrics or {},
            "tokenizers": {} if module else tokenizer_prints(model.components),
            "files": files,
        }
        if expert_sections:  # only then: a bundle without experts stays readable by older runtimes
            manifest["experts"] = expert_sections
        (tmp / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2, default=_json_default) + "\n")
    return out


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "value"):
        return obj.value
    raise TypeError(f"cannot serialise {type(obj).__name__}")


def _stored_bits_or_none(plan: Plan) -> float | None:
    """The plan's average stored weight bits, or None for a plan that does not record its shapes."""
    try:
        return plan.avg_stored_weight_bits
    except ValueError:
        return None
