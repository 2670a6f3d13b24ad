"""diffusers' own quantizers against a diffkiln bundle, on the same prompts and seeds: what a
diffusers user gets from ``quantization_config`` (optimum-quanto, torchao) and how close it stays
to FP, beside the bundle; and whether each round-trips through ``save_pretrained`` /
``from_pretrained`` and in what file format (a pickle is code execution at load).

    pip install --no-deps optimum-quanto torchao   # not diffkiln dependencies
    python tools/bench_diffusers_quantizers.py --model shapes-unet --bundle BUNDLE [--prompts 8]

Writes tools/results/bench_diffusers_quantizers_{model}.json.
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from diffkiln.runtime import load
from diffkiln.zoo.registry import resolve_target

PROMPTS = [
    "a red circle on the left", "a blue square at the top", "a green triangle on the right",
    "a yellow circle at the bottom", "a red square left of a blue circle", "a green circle above a yellow square",
    "a blue triangle in the center", "a yellow triangle right of a red circle",
]  # fmt: skip


def _sqnr(ref: np.ndarray, x: np.ndarray) -> float:
    noise = float(np.sum((ref - x) ** 2))
    return math.inf if noise == 0 else 10 * math.log10(float(np.sum(ref**2)) / noise)


def _latents(pipe: Any, prompts: list[str], steps: int) -> np.ndarray:
    pipe.set_progress_bar_config(disable=True)
    out = []
    with torch.no_grad():
        for i, p in enumerate(prompts):
            g = torch.Generator().manual_seed(i)
            out.append(pipe(p, num_inference_steps=steps, output_type="latent", generator=g).images.float().numpy())
    return np.concatenate(out)


def _quantizers() -> dict[str, Any]:
    from diffusers import QuantoConfig, TorchAoConfig
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig, Int8WeightOnlyConfig

    found: dict[str, Any] = {"quanto int8 weights (W8A16)": lambda: QuantoConfig(weights_dtype="int8")}
    found["torchao int8 weight-only (W8A16)"] = lambda: TorchAoConfig(Int8WeightOnlyConfig())
    found["torchao int8 dynamic activations (W8A8 dynamic)"] = lambda: TorchAoConfig(
        Int8DynamicActivationInt8WeightConfig()
    )
    return found


def _error(exc: Exception) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0][:300] if text else '(no message)'}"


def input_ranks(pipe: Any, name: str) -> dict[str, int]:
    """The rank of each Linear's input in one denoising step (torchao's per-tensor activation
    scale must have the input's rank)."""
    ranks: dict[str, int] = {}
    handles = [m.register_forward_pre_hook(lambda mod, args, fqn=fqn: ranks.setdefault(fqn, args[0].ndim) and None)
               for fqn, m in getattr(pipe, name).named_modules() if isinstance(m, torch.nn.Linear)]  # fmt: skip
    try:
        _latents(pipe, PROMPTS[:1], 1)
    finally:
        for h in handles:
            h.remove()
    return ranks


def torchao_from_bundle(
    bundle_pipe: Any, fp_denoiser: torch.nn.Module, name: str, ranks: dict[str, int]
) -> tuple[Any, dict[str, Any]]:
    """The FP denoiser with the bundle's Linear layers as torchao's static W8A8: the bundle's int8
    codes (dequantized and requantized per row by torchao, which gives the same codes where a row
    spans +-127) and its per-tensor activation scale and zero point. Returns (model, what was lost)."""
    import copy

    from torchao.quantization import FqnToConfig, Int8StaticActivationInt8WeightConfig, quantize_
    from torchao.quantization.granularity import PerRow, PerTensor
    from torchao.quantization.quant_primitives import MappingType

    model = copy.deepcopy(fp_denoiser)
    configs: dict[str, Any] = {}
    lost: dict[str, int] = {}
    for fqn, m in getattr(bundle_pipe, name).named_modules():
        kind = type(m).__name__
        if kind not in ("QLinear", "QConv2d", "QConv1d", "QConv3d"):
            continue
        why = ("convolution (torchao's static int8 is Linear-only)" if kind != "QLinear"
               else "smoothing" if m.smooth_inv is not None
               else "timestep-aware ranges" if len(m.step_grids) > 1
               else "not static 8-bit" if m.dynamic or m.weight_only or m.weight_packed is not None
               else None)  # fmt: skip
        if getattr(m, "bos_rows", None) is not None:
            lost["BOS rows (kept the layer, dropped its FP rows)"] = (
                lost.get("BOS rows (kept the layer, dropped its FP rows)", 0) + 1
            )
        if why is not None:
            lost[why] = lost.get(why, 0) + 1
            continue
        linear = model.get_submodule(fqn)
        scale, _ = m.scale_and_bias()
        weight = m.codes_t().t().float() * scale[:, None]
        linear.weight.data.copy_(weight.reshape(linear.weight.shape))
        g = m.act_grid
        shape = [1] * ranks.get(fqn, 2)
        configs[fqn] = Int8StaticActivationInt8WeightConfig(
            act_quant_scale=torch.full(shape, g.scale), act_quant_zero_point=torch.full(shape, g.zero_point),
            granularity=[PerTensor(), PerRow()], act_mapping_type=MappingType.ASYMMETRIC,
            set_inductor_config=False,
        )  # fmt: skip
    quantize_(model, FqnToConfig(fqn_to_config=configs), filter_fn=None)
    return model, {"static_w8a8_linear_layers": len(configs), "kept_float": lost}


def _files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob("*") if p.is_file() and p.suffix in (".safetensors", ".bin", ".pt"))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="shapes-unet")
    ap.add_argument("--bundle", type=Path, required=True, help="a W8A8 bundle of --model")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--steps", type=int, default=20)
    a = ap.parse_args()
    from diffusers import DiffusionPipeline

    path = resolve_target(a.model).path
    prompts = PROMPTS[: a.prompts]
    fp = DiffusionPipeline.from_pretrained(path, dtype=torch.float32)
    denoiser_name = "unet" if hasattr(fp, "unet") else "transformer"
    denoiser_cls = type(getattr(fp, denoiser_name))
    ref = _latents(fp, prompts, a.steps)
    t0 = time.perf_counter()
    rows: dict[str, Any] = {"diffkiln bundle": {"sqnr_db": _sqnr(ref, _latents(load(a.bundle), prompts, a.steps))}}
    rows["diffkiln bundle"]["seconds"] = round(time.perf_counter() - t0, 2)
    for name, make in _quantizers().items():
        row: dict[str, Any] = {}
        try:
            q = denoiser_cls.from_pretrained(path, subfolder=denoiser_name, quantization_config=make(),
                                             torch_dtype=torch.float32)  # fmt: skip
            pipe = DiffusionPipeline.from_pretrained(path, dtype=torch.float32, **{denoiser_name: q})
            t0 = time.perf_counter()
            row["sqnr_db"] = _sqnr(ref, _latents(pipe, prompts, a.steps))
            row["seconds"] = round(time.perf_counter() - t0, 2)
        except Exception as exc:  # a quantizer that cannot run here is a result, not a crash
            row["error"] = _error(exc)
            rows[name] = row
            print(name, row, flush=True)
            continue
        with tempfile.TemporaryDirectory() as tmp:
            try:
                q.save_pretrained(tmp)
                row["saved_files"] = _files(Path(tmp))
                again = denoiser_cls.from_pretrained(tmp)
                pipe2 = DiffusionPipeline.from_pretrained(path, dtype=torch.float32, **{denoiser_name: again})
                row["reloaded_sqnr_vs_first_db"] = _sqnr(_latents(pipe, prompts[:1], a.steps),
                                                         _latents(pipe2, prompts[:1], a.steps))  # fmt: skip
            except Exception as exc:
                row["round_trip_error"] = _error(exc)
        rows[name] = row
        print(name, row, flush=True)
    try:
        ranks = input_ranks(fp, denoiser_name)
        model, what = torchao_from_bundle(load(a.bundle), getattr(fp, denoiser_name), denoiser_name, ranks)
        pipe = DiffusionPipeline.from_pretrained(path, dtype=torch.float32, **{denoiser_name: model})
        row = {"sqnr_db": _sqnr(ref, _latents(pipe, prompts, a.steps)), **what}
        with tempfile.TemporaryDirectory() as tmp:
            try:
                model.save_pretrained(tmp)
                row["saved_files"] = _files(Path(tmp))
            except Exception as exc:
                row["round_trip_error"] = _error(exc)
    except Exception as exc:
        row = {"error": _error(exc)}
    rows["torchao static W8A8 from the bundle's codes and scales"] = row
    print(row, flush=True)
    out = Path(f"tools/results/bench_diffusers_quantizers_{a.model}.json")
    out.write_text(json.dumps({"model": a.model, "prompts": len(prompts), "steps": a.steps, "latent_sqnr_vs_fp": rows},
                              indent=2, default=str) + "\n")  # fmt: skip
    print(json.dumps(rows, indent=2, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
