"""Denoiser speed, memory and accuracy on a CUDA GPU: diffkiln's integer layers against FP16, BF16
(eager and compiled) and torchao, side by side in one process per model.

Variants (each built fresh from the same seeded random weights, on the device):

* ``fp16``, ``bf16``: the float model cast; ``bf16-compile``: the same under ``torch.compile``;
* ``torchao-compile``: torchao's ``Int8DynamicActivationInt8WeightConfig`` under ``torch.compile``
  (where torchao is installed and it runs); ``bf16-cudagraphs`` and ``w8a8-cudagraphs`` (not run by
  default): ``torch.compile(mode="reduce-overhead")``, which replays CUDA graphs;
* ``w8a8``: diffkiln's W8A8 layers (static activations, calibrated on the model itself), everything
  else in BF16; ``w8a8-compile``: the same under ``torch.compile`` (the Triton kernels are custom ops);
* ``w4a8``: the same plan with 4-bit packed weights (Triton kernel reading them packed);
* ``w4a16``: 4-bit packed weights, BF16 activations (weight-only).

Per variant and batch: the median ms per denoiser call (CUDA events; ``time.perf_counter`` on the
CPU), the peak memory allocated during the calls, the weights' bytes, and the output's SQNR
against the FP32 model on the same call. Lines of JSON go to ``--out``; a Markdown table to stdout.

Usage (on the GPU; ``--device cpu --model tiny-sd15`` is the dry run CI's machine can do):
    python tools/bench_gpu.py --model sd15-unet --batches 2 16 --out results.jsonl
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch

import diffkiln.api as dk
from diffkiln.core.metrics import sqnr_db
from diffkiln.core.plan import WeightSpec
from diffkiln.runtime.dtype import cast_float_parts
from diffkiln.runtime.memory import resident_bytes
from diffkiln.zoo.architectures import FULL_SIZE_DENOISERS, build_full_denoiser, full_denoiser_inputs

VARIANTS = ("fp16", "bf16", "bf16-compile", "torchao-compile", "w8a8", "w8a8-compile", "w4a8", "w4a16")
EXTRA = ("bf16-cudagraphs", "w8a8-cudagraphs")  # torch.compile(mode="reduce-overhead"): CUDA graphs
TINY = "tiny-sd15"  # a small UNet of the SD1.5 class, for the CPU dry run


def _build(name: str, device: str) -> torch.nn.Module:
    torch.manual_seed(0)  # the same weights for every variant
    if name == TINY:
        from diffusers import UNet2DConditionModel

        with torch.device(device):
            return UNet2DConditionModel(block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=32,
                                        attention_head_dim=8, sample_size=8,
                                        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D")).eval()  # fmt: skip
    return build_full_denoiser(name, device)


def _inputs(name: str, batch: int, latent: int, timestep: float, seed: int) -> dict[str, Any]:
    if name == TINY:
        g = torch.Generator().manual_seed(seed)
        sample = torch.randn(batch, 4, latent, latent, generator=g)
        return {"sample": sample, "timestep": torch.full((batch,), timestep),
                "encoder_hidden_states": torch.randn(batch, 77, 32, generator=g)}  # fmt: skip
    return full_denoiser_inputs(name, batch, latent, timestep, seed)


def _to(value: Any, device: str, dtype: torch.dtype) -> Any:
    if isinstance(value, dict):
        return {k: _to(v, device, dtype) for k, v in value.items()}
    if isinstance(value, torch.Tensor):
        return value.to(device, dtype) if value.is_floating_point() else value.to(device)
    return value


def _plan(name: str, device: str, latent: int) -> tuple[Any, Any]:
    """Calibration statistics and a W8A8 plan of the FP32 model (random inputs at spread timesteps)."""
    model = _build(name, device)
    calls = [_to(_inputs(name, 1, latent, t, 100 + i), device, torch.float32)
             for i, t in enumerate((999.0, 600.0, 300.0, 50.0))]  # fmt: skip
    with torch.no_grad():
        stats = dk.calibrate(model, dk.CalibrationConfig(samples=1, samples_per_step=512, progress=False),
                             inputs=calls)  # fmt: skip
        plan = dk.make_plan(model, stats, dk.W8A8Config(), dk.SearchContext(source_id=name))
    del model
    return stats, plan


def _low_bit(plan: Any, weight_only: bool) -> Any:
    """The W8A8 plan with every integer layer's weights at 4 bits (packed, groups of 64 inputs),
    activations kept or float."""
    spec = WeightSpec(bits=4, scale_dtype="float16", group_size=64)
    layers = tuple(
        dataclasses.replace(lp, weight=spec, act=None if weight_only else lp.act, output=None,
                            smooth_alpha=None if weight_only else lp.smooth_alpha) if lp.quantized else lp
        for lp in plan.layers
    )  # fmt: skip
    return dataclasses.replace(plan, layers=layers)


def _variant(variant: str, name: str, device: str, stats: Any, plan: Any) -> tuple[Any, torch.dtype]:
    """The model of one variant and the dtype of its float inputs."""
    model = _build(name, device)
    if variant in ("fp16",):
        return model.half(), torch.float16
    if variant.startswith("bf16"):
        model = model.to(torch.bfloat16)
    elif variant == "torchao-compile":
        from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_

        model = model.to(torch.bfloat16)
        quantize_(model, Int8DynamicActivationInt8WeightConfig())
    else:
        chosen = {"w4a8": _low_bit(plan, False), "w4a16": _low_bit(plan, True)}.get(variant, plan)
        with torch.no_grad():
            model = dk.quantize_(model, chosen, stats)
        cast_float_parts(model, torch.bfloat16)
    if variant.endswith("-compile"):
        model = torch.compile(model)
    elif variant.endswith("-cudagraphs"):
        model = torch.compile(model, mode="reduce-overhead")
    return model, torch.bfloat16


def _time(model: Any, kw: dict[str, Any], device: str, warmup: int, repeat: int) -> tuple[list[float], Any]:
    out = None
    with torch.no_grad():
        for _ in range(warmup):
            out = model(**kw, return_dict=False)[0]
        times = []
        for _ in range(repeat):
            if device == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                out = model(**kw, return_dict=False)[0]
                end.record()
                torch.cuda.synchronize()
                times.append(start.elapsed_time(end))
            else:
                t = time.perf_counter()
                out = model(**kw, return_dict=False)[0]
                times.append(1000 * (time.perf_counter() - t))
    return times, out


def run(a: argparse.Namespace) -> list[dict[str, Any]]:
    """Every variant at every batch; one row each."""
    stats, plan = _plan(a.model, a.device, a.latent)
    rows = []
    references = {}
    fp32 = _build(a.model, a.device)
    with torch.no_grad():
        for batch in a.batches:
            kw = _to(_inputs(a.model, batch, a.latent, 500.0, 1), a.device, torch.float32)
            references[batch] = fp32(**kw, return_dict=False)[0].float().cpu()
    del fp32
    for variant in a.variants:
        t0 = time.perf_counter()
        try:
            model, dtype = _variant(variant, a.model, a.device, stats, plan)
        except Exception as exc:  # a peer that does not install or run here is a row, not a crash
            rows.append({"model": a.model, "variant": variant, "note": f"failed to build: {exc!r}"[:300]})
            continue
        weights = _weight_bytes(model)
        for batch in a.batches:
            kw = _to(_inputs(a.model, batch, a.latent, 500.0, 1), a.device, dtype)
            if a.device == "cuda":
                torch.cuda.reset_peak_memory_stats()
            try:
                times, out = _time(model, kw, a.device, a.warmup, a.repeat)
            except Exception as exc:
                rows.append({"model": a.model, "variant": variant, "batch": batch, "note": f"failed: {exc!r}"[:300]})
                continue
            rows.append({
                "model": a.model, "variant": variant, "batch": batch, "device": _device_name(a.device),
                "ms_per_call": round(statistics.median(times), 2), "ms_all": [round(t, 2) for t in times],
                "peak_allocated_bytes": torch.cuda.max_memory_allocated() if a.device == "cuda" else None,
                "weight_bytes": weights, "build_seconds": round(time.perf_counter() - t0, 1),
                "sqnr_vs_fp32_db": round(sqnr_db(references[batch].numpy(), out.float().cpu().numpy()), 2),
            })  # fmt: skip
            print(json.dumps(rows[-1]), flush=True)
        del model
        gc.collect()
        if a.device == "cuda":
            torch.cuda.empty_cache()
    return rows


def _weight_bytes(model: Any) -> int | None:
    try:
        return resident_bytes(getattr(model, "_orig_mod", model))
    except (NotImplementedError, RuntimeError, TypeError):
        return None


def _device_name(device: str) -> str:
    return torch.cuda.get_device_name() if device == "cuda" else "cpu"


def table(rows: list[dict[str, Any]]) -> str:
    """A Markdown table: one row per (model, variant), one column group per batch."""
    batches = sorted({r["batch"] for r in rows if "batch" in r})
    head = "| model | variant | " + " | ".join(f"batch {b}: ms (x BF16)" for b in batches) + " | weights | SQNR |"
    lines = [head, "|" + "---|" * (4 + len(batches))]
    bf16 = {(r["model"], r["batch"]): r.get("ms_per_call") for r in rows if r.get("variant") == "bf16"}
    for key in dict.fromkeys((r["model"], r["variant"]) for r in rows):
        mine = [r for r in rows if (r["model"], r["variant"]) == key]
        cells = []
        for b in batches:
            r = next((r for r in mine if r.get("batch") == b), None)
            ms, base = (r or {}).get("ms_per_call"), bf16.get((key[0], b))
            cells.append("n/a" if ms is None else f"{ms:.1f} ({ms / base:.2f}x)" if base else f"{ms:.1f}")
        weights = next((r.get("weight_bytes") for r in mine if r.get("weight_bytes")), None)
        sqnr = next((r.get("sqnr_vs_fp32_db") for r in mine if "sqnr_vs_fp32_db" in r), None)
        note = next((r["note"] for r in mine if "note" in r), "")
        tail = f" | {weights / 2**20:.1f} MiB | {sqnr} dB |" if weights else f" | n/a | {sqnr} | {note[:80]} |"
        lines.append(f"| {key[0]} | {key[1]} | " + " | ".join(cells) + tail)
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="sd15-unet", choices=[*FULL_SIZE_DENOISERS, TINY])
    ap.add_argument("--batches", type=int, nargs="+", default=[2, 16])
    ap.add_argument("--latent", type=int, default=64, help="latent side (64: 512 px for SD1.5)")
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS + EXTRA)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--repeat", type=int, default=10)
    ap.add_argument("--out", type=Path, help="append the rows here as JSON lines")
    a = ap.parse_args()
    rows = run(a)
    if a.out is not None:
        with a.out.open("a") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    print(table(rows))


if __name__ == "__main__":
    main()
