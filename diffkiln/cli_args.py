"""The ``diffkiln`` command line's arguments: the parser, and how options map to config fields.

Recipe and export-format options default to None ("not given"); :data:`RECIPE_OPTIONS` and
:data:`FORMAT_OPTIONS` name the config field each one sets, so a recipe or format config is built
from exactly the options the user gave, and an option that does not apply is an error.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from diffkiln import __version__
from diffkiln.cli_recipe_args import add_cache_args, add_mixed_args
from diffkiln.cli_values import (
    call_arg,
    device_name,
    float_list,
    int_list,
    non_negative_float,
    non_negative_int,
    parse_call_args,
    positive_int,
)

__all__ = ["FORMAT_OPTIONS", "RECIPE_OPTIONS", "build_parser", "parse_call_args"]

_EPILOG = """examples:
  diffkiln models
  diffkiln generate shapes-unet --prompt "a red circle on the left" --out out/gen
  diffkiln report shapes-dit --eval-size 200 --out out/report-dit
  diffkiln optimize shapes-unet --recipe w8a8 --out out/shapes-unet-w8a8
  diffkiln optimize shapes-unet --recipe mixed --avg-weight-bits 4 --out out/shapes-unet-mixed4
  diffkiln optimize ./my-video-pipeline --call-arg num_frames=9 --call-arg height=64 --out out/video-w8a8
  diffkiln sensitivity shapes-unet --out out/sens-unet
  diffkiln inspect out/shapes-unet-w8a8
  diffkiln export out/shapes-unet-w8a8 --format onnx --out out/unet-onnx
"""

RECIPE_OPTIONS: dict[str, str] = {
    "act_mode": "act_mode",
    "weight_bits": "weight_bits",
    "act_bits": "act_bits",
    "include": "include",
    "exclude": "exclude",
    "no_bos": "bos_aware",
    "bos_positions": "bos_positions",
    "smooth": "smooth",
    "smooth_alpha": "smooth_alpha",
    "timestep_aware": "timestep_aware",
    "requantize_conv_outputs": "requantize_conv_outputs",
    "avg_weight_bits": "avg_weight_bits",
    "avg_act_bits": "avg_act_bits",
    "weight_candidates": "weight_candidates",
    "act_candidates": "act_candidates",
    "weight_group_size": "group_size",
    "weight_budget": "budget",
    "content_layers": "content",
    "quality_layers": "quality",
    "sensitivity_prompts": "sensitivity_prompts",
    "select_prompts": "select_prompts",
    "workers": "workers",
    "latency_budget": "latency_budget_ms",
}
"""Parsed option (argparse dest) -> recipe config field."""

DEPLOY_TARGETS = ("mindiesd",)
"""The names of ``diffkiln.optimizer.TARGETS`` (kept here so parsing arguments imports no torch)."""

FORMAT_OPTIONS: dict[str, str] = {
    "out": "out",
    "opset": "opset",
    "static_shapes": "dynamic",
    "compute": "compute",
    "matmulnbits": "matmulnbits",
    "denoiser_only": "components",
    "keep_fp": "keep_fp",
    "dtype": "dtype",
    "ranks": "ranks",
    "overwrite": "overwrite",
    "no_progress": "progress",
}
"""Parsed option (argparse dest) -> export format config field (flags that negate are inverted)."""


def _add_call_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--call-arg",
        action="append",
        default=[],
        type=call_arg,
        metavar="KEY=VALUE",
        help="a pipeline-call argument for every call, e.g. num_frames=9, height=64, max_sequence_length=64, "
        "audio_end_in_s=2.0 (VALUE is JSON, else text; repeatable)",
    )
    p.add_argument("--call-args", type=Path, metavar="FILE.json", help="pipeline-call arguments as a JSON object")
    p.add_argument("--denoiser", metavar="NAME",
                   help="the pipeline component to use as denoiser (default: found; with experts of its class that "
                        "the sampler runs at other steps, as Wan 2.2's transformer_2, all are quantized, while a "
                        "named one is quantized alone)")  # fmt: skip


def _add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--steps", type=positive_int, help="denoising steps (default: the model's, 20 for built-ins)")
    p.add_argument("--guidance", type=non_negative_float, help="classifier-free guidance scale (default: the model's)")
    p.add_argument("--seed", type=non_negative_int, default=0, help="base seed; sample i uses seed+i (default 0)")
    p.add_argument("--batch-size", type=positive_int, default=50, help="samples per pipeline call (default 50)")
    p.add_argument("--device", type=device_name, default="cpu",
                   help="auto, cpu, cuda (cuda:N) or npu (default cpu; auto: NPU, else GPU, else CPU)")  # fmt: skip
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    _add_vae_tiling(p, "")
    _add_call_args(p)


def _add_vae_tiling(p: argparse.ArgumentParser, where: str) -> None:
    p.add_argument("--vae-tiling", action="store_true",
                   help=f"decode in tiles{where}: turn on the VAE's tiled decoding (enable_tiling()); needed by a VAE "
                   "that decodes only in tiles (Allegro's), and saves memory on large images and clips")  # fmt: skip


def _add_calibration_args(p: argparse.ArgumentParser) -> None:
    cal = p.add_mutually_exclusive_group()
    cal.add_argument("--calib-prompts", type=Path, metavar="FILE", help="calibration prompts, one per line")
    cal.add_argument("--calib-size", type=positive_int, default=32, help="calibration samples (default 32)")
    p.add_argument("--steps", type=positive_int, help="sampler steps for calibration (default: the model's)")
    p.add_argument("--guidance", type=non_negative_float, help="guidance for calibration (default: the model's)")
    p.add_argument("--calib-image", action="append", default=[], type=Path, metavar="FILE",
                   help="an input image to calibrate a pipeline that starts from one on (image-to-image, inpainting, "
                   "image-to-video; repeatable, taken in turn); default: seeded synthetic images")  # fmt: skip
    p.add_argument("--calib-mask-image", action="append", default=[], type=Path, metavar="FILE",
                   help="an inpainting pipeline's mask, white where it repaints (repeatable, with --calib-image)")
    p.add_argument("--calib-control-image", action="append", default=[], type=Path, metavar="FILE",
                   help="a ControlNet image-to-image or inpainting pipeline's control image (repeatable, with "
                   "--calib-image)")  # fmt: skip
    p.add_argument("--calib-video", action="append", default=[], type=Path, metavar="CLIP",
                   help="an input clip to calibrate a video-to-video pipeline on: an animated GIF/WebP or a folder "
                   "of frames (repeatable, taken in turn); default: seeded synthetic clips")  # fmt: skip
    p.add_argument("--cache-dir", type=Path, help="calibration cache (default $DIFFKILN_CACHE or ~/.cache/diffkiln)")
    p.add_argument("--seed", type=non_negative_int, default=0, help="calibration seed (default 0)")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    _add_call_args(p)


def _add_layer_args(p: argparse.ArgumentParser) -> None:
    """Options of the layer selection and activation grids, shared by the w8a8 and mixed recipes."""
    p.add_argument("--include", action="append", metavar="GLOB",
                   help="quantize layers matching GLOB although kept in FP by default: input/output projections, "
                   "conditioning embedders (repeatable)")  # fmt: skip
    p.add_argument("--exclude", action="append", metavar="GLOB", help="keep layers matching GLOB in FP (repeatable)")
    p.add_argument("--no-bos", action="store_const", const=False, help="disable BOS-aware text rows")
    p.add_argument(
        "--bos-positions",
        type=int_list,
        metavar="LIST",
        help="text positions to treat as prompt-invariant instead of the verified ones, e.g. 0",
    )
    p.add_argument("--smooth", choices=["auto", "all", "off"],
                   help="SmoothQuant the input channels of Linear layers: auto = layers whose largest input channel "
                   "exceeds 8x the median one (default), all, off")  # fmt: skip
    p.add_argument("--smooth-alpha", type=float, help="smoothing strength in (0, 1) (default 0.5)")


def _add_optimize(sub: Any) -> None:
    o = sub.add_parser(
        "optimize",
        help="calibrate, plan and freeze a model into a deployable bundle",
        description="Calibrate MODEL over its sampler's real timesteps, plan the quantization with a recipe "
        "and write a self-contained bundle that `diffkiln generate|report|inspect BUNDLE` and "
        "diffkiln.runtime.load() run on integer kernels. Recipes: w8a8 (int8 per-channel weights, int8 "
        "activations, BOS-aware text rows); mixed (per-layer 2/3/4/8/16-bit weights chosen by integer "
        "programming from measured sensitivities, sub-byte weights kept packed). Any diffusers pipeline "
        "folder works: pass its call arguments with --call-arg.",
    )
    o.add_argument("target", metavar="MODEL", help="built-in model name or diffusers folder")
    o.add_argument("--recipe", default="w8a8",
                   help="compression recipe: w8a8 (default), mixed, cache (float weights, a searched cache "
                   "schedule) or sparse (float weights, searched sparse-attention masks)")  # fmt: skip
    _add_calibration_args(o)
    _add_layer_args(o)
    o.add_argument(
        "--act-mode",
        choices=["static", "dynamic"],
        help="w8a8: static per-tensor (calibrated, default) or dynamic per-token activations",
    )
    o.add_argument("--weight-bits", type=int,
                   help="w8a8: the weight grid, 8 (default) or 7; with 8-bit activations, 7-bit weights are the way "
                   "to oneDNN's exact fast int8 kernels on x86 CPUs without VNNI")  # fmt: skip
    o.add_argument("--act-bits", type=int, help="w8a8: the static activation grid, 8 (default) or 7")
    o.add_argument(
        "--timestep-aware",
        action="store_const",
        const=True,
        help="w8a8: one static activation range per sampler step; the runtime uses the nearest one's",
    )
    o.add_argument("--requantize-conv-outputs", action="store_const", const=True,
                   help="w8a8: round each integer convolution's output onto a calibrated int8 grid, as onnxruntime's "
                   "quantize_static does, so that onnxruntime runs the convolutions as int8 QLinearConv, at the cost "
                   "of one more rounding per convolution")  # fmt: skip
    add_mixed_args(o)
    o.add_argument("--float-storage", choices=["lossless", "float16"],
                   help="how the bundle stores weight scales, biases, BOS rows and FP layers (default: lossless for "
                   "w8a8, float16 for mixed)")  # fmt: skip
    o.add_argument("--sweep", type=float_list, metavar="LIST",
                   help="mixed: build bundles at each average weight bits (e.g. 3,4,5,6,8) plus uniform W4A8 and W8A8 "
                   "references under --out, evaluate them and write sweep.json and sweep.html")  # fmt: skip
    o.add_argument("--sweep-eval-size", type=positive_int, default=50,
                   help="--sweep / --sweep-cache / --sweep-attn: prompts per set (default 50)")  # fmt: skip
    _add_vae_tiling(o, " in the sweep's evaluation")
    add_cache_args(o)
    o.add_argument("--attn-density", type=float, metavar="FRACTION",
                   help="search block-sparse attention masks per layer, step group and head that keep this fraction "
                   "of the long attention layers' FLOPs, e.g. 0.35; with --recipe sparse alone (float weights) or "
                   "composed with another recipe (docs/sparse-attention.md)")  # fmt: skip
    o.add_argument(
        "--attn-block",
        type=positive_int,
        metavar="TOKENS",
        help="tokens per sparse-attention mask block (default 64; 128 exports exactly to MindIE-SD)",
    )
    o.add_argument("--sweep-attn", type=float_list, metavar="LIST",
                   help="build one bundle per attention density (e.g. 0.5,0.35,0.2) under --out, evaluate them "
                   "against FP and write sweep.json and sweep.html (the Pareto front); with --cache-budget, "
                   "one schedule in every bundle and the masks searched under it")  # fmt: skip
    o.add_argument(
        "--target",
        dest="deploy_target",
        choices=DEPLOY_TARGETS,
        help="plan only what this runtime executes quantized, so the bundle and its report are the deployed "
        "model (mindiesd: Linear layers, no BOS rows; its convolutions stay float)",
    )
    o.add_argument("--out", type=Path, required=True, metavar="BUNDLE", help="bundle directory to write")
    o.add_argument("--overwrite", action="store_true", help="replace an existing bundle directory")


def _add_report(sub: Any) -> None:
    r = sub.add_parser(
        "report",
        help="evaluate a model or bundle: quality, fidelity, speed, memory; report.json and report.html",
        description="Generate evaluation samples, judge them where a judge exists, and write DIR/report.json and "
        "a self-contained DIR/report.html. For a bundle, the FP baseline runs on the same inputs and seeds and "
        "the report adds fidelity (latent SQNR, image PSNR/SSIM or audio SNR), sizes, speed and memory.",
    )
    r.add_argument(
        "target", metavar="TARGET", help="built-in model name, diffusers folder, bundle, or ONNX export (onnxruntime)"
    )
    src = r.add_mutually_exclusive_group()
    src.add_argument("--eval-size", type=positive_int, default=200, help="prompts per set (default 200)")
    src.add_argument("--eval-prompts", type=Path, metavar="FILE", help="evaluate these prompts instead")
    r.add_argument(
        "--judge",
        choices=["auto", "shapes", "shapes-video", "none"],
        default="auto",
        help="content judge: auto uses the built-in model's own; 'shapes' (images) or 'shapes-video' (clips) "
        "for a copy of a shapes model",
    )
    r.add_argument("--out", type=Path, default=None, help="output folder (default out/report-<target>)")
    r.add_argument(
        "--baseline",
        metavar="MODEL",
        help="for a bundle: the FP model to compare with (default: the source recorded in the bundle); it must be "
        "the bundle's source model (same classes, same weight hash)",
    )
    r.add_argument(
        "--force-baseline", action="store_true", help="compare with --baseline even when it is another model"
    )
    r.add_argument("--no-bos-comparison", action="store_true", help="for a bundle: skip the BOS on/off comparison")
    r.add_argument(
        "--fail-on-regression",
        type=Path,
        metavar="OLD_REPORT.json",
        help="exit with status 3 when quality falls below this earlier report beyond the tolerance",
    )
    r.add_argument(
        "--tolerance",
        type=non_negative_float,
        default=0.02,
        help="allowed drop of each content accuracy for --fail-on-regression (default 0.02)",
    )
    r.add_argument(
        "--sqnr-tolerance",
        type=non_negative_float,
        default=1.0,
        help="allowed drop of latent SQNR in dB for --fail-on-regression (default 1.0)",
    )
    _add_sampling_args(r)


def _add_export(sub: Any) -> None:
    e = sub.add_parser(
        "export",
        help="write a bundle as ONNX (QDQ, int8/int4 initializers) or in the MindIE-SD / msModelSlim format",
        description="--format onnx: one ONNX model per component (denoiser.onnx with QuantizeLinear/DequantizeLinear "
        "around every quantized MatMul and Conv; text encoders; VAE decoder), dynamic axes where the model allows "
        "(each dynamic graph is run in onnxruntime at a second shape before it is declared dynamic), checked with "
        "onnx.checker; run it with diffkiln.runtime.load(DIR, backend='onnxruntime'). --format mindiesd: the "
        "denoiser as quant_model_weight_*.safetensors + quant_model_description_*.json for MindIE-SD's "
        "quantize(model, quant_des_path). See docs/onnx-export.md and docs/mindiesd-export.md.",
    )
    e.add_argument("bundle", metavar="BUNDLE", type=Path, help="bundle directory")
    e.add_argument("--format", default="onnx", help="export format: onnx (default) or mindiesd")
    e.add_argument("--out", type=Path, required=True, metavar="DIR", help="output folder (written atomically)")
    e.add_argument("--opset", type=positive_int, help="onnx: opset, 19 to 25 (default 21; >= 21 INT4, 25 INT2)")
    e.add_argument("--static-shapes", action="store_const", const=False, help="onnx: fix every axis as recorded")
    e.add_argument(
        "--compute",
        choices=["qdq", "integer"],
        help="onnx: qdq (default): QuantizeLinear/DequantizeLinear around float MatMul/Conv, the form "
        "TensorRT and Ascend ATC fuse; integer: MatMulInteger/ConvInteger, the runtime's own arithmetic",
    )
    e.add_argument(
        "--matmulnbits",
        action="store_const",
        const=True,
        help="onnx: store 4- and 2-bit Linear weights as onnxruntime's com.microsoft.MatMulNBits",
    )
    e.add_argument("--denoiser-only", action="store_const", const=False, help="onnx: skip text encoders and the VAE")
    e.add_argument(
        "--keep-fp",
        action="store_const",
        const=True,
        help="a layer the format cannot express is kept in float (warned and listed) instead of failing",
    )
    e.add_argument(
        "--dtype",
        choices=["float16", "bfloat16"],
        help="mindiesd: the dtype the model runs in; pass the same to quantize() (default float16)",
    )
    e.add_argument("--ranks", type=positive_int, help="mindiesd: one description and weight file per rank (_0 .. _N-1)")
    e.add_argument("--overwrite", action="store_const", const=True, help="replace an existing DIR")
    e.add_argument("--no-progress", action="store_const", const=False, help="hide the progress bar")


def build_parser() -> argparse.ArgumentParser:
    """The ``diffkiln`` argument parser."""
    parser = argparse.ArgumentParser(
        prog="diffkiln",
        description="diffkiln: an offline compiler for diffusion models. TARGET is a built-in model name "
        "(see `diffkiln models`) or a local diffusers pipeline folder.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"diffkiln {__version__}")
    parser.add_argument(
        "--threads",
        type=positive_int,
        metavar="N",
        help="CPU threads for torch and onnxruntime (default: $OMP_NUM_THREADS, else the CPUs other processes "
        "leave idle when the command starts); give it before the command: diffkiln --threads 2 optimize ...",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    sub.add_parser("models", help="list the built-in models, one per line")
    g = sub.add_parser(
        "generate",
        help="generate samples (images, videos, audio) from prompts",
        description="One output per prompt (PNG, GIF for video, WAV for audio); sample i uses seed+i.",
    )
    g.add_argument(
        "target", metavar="TARGET", help="built-in model name, diffusers folder, bundle, or ONNX export (onnxruntime)"
    )
    g.add_argument("--prompt", action="append", default=[], metavar="TEXT", help="a prompt (repeatable)")
    g.add_argument("--prompts", type=Path, metavar="FILE", help="file with one prompt per line ('#' comments)")
    g.add_argument("--samples", type=positive_int, help="for pipelines without text: how many samples")
    g.add_argument("--image", action="append", default=[], metavar="FILE",
                   help="an input image for a pipeline that starts from one (image-to-image, inpainting, "
                   "image-to-video): one for every sample, or one per prompt (repeatable); without it such a "
                   "pipeline gets seeded synthetic images")  # fmt: skip
    g.add_argument("--video", action="append", default=[], metavar="CLIP",
                   help="an input clip for a video-to-video pipeline: an animated GIF/WebP or a folder of frames; "
                   "one for every sample, or one per prompt (repeatable); without it, synthetic clips")  # fmt: skip
    g.add_argument("--mask-image", action="append", default=[], metavar="FILE",
                   help="an inpainting pipeline's mask, white where it repaints: one for every sample, or one per "
                   "prompt (repeatable; with --image)")  # fmt: skip
    g.add_argument("--control-image", action="append", default=[], metavar="FILE",
                   help="a ControlNet image-to-image or inpainting pipeline's control image (its control_image; "
                   "repeatable, with --image)")  # fmt: skip
    g.add_argument("--out", type=Path, default=Path("out/generate"), help="output folder (default out/generate)")
    _add_sampling_args(g)
    _add_report(sub)
    _add_optimize(sub)
    s = sub.add_parser(
        "sensitivity",
        help="measure each layer's sensitivity to 2/3/4/8-bit weights and 8-bit activations",
        description="Run (or read back from the cache) the mixed recipe's metric-decoupled sensitivity analysis "
        "alone: each layer quantized by itself (SIMULATED, fake-quant), content layers scored by the final "
        "outputs against FP, the rest by the SQNR of the denoiser output. Writes DIR/sensitivity.json and .html.",
    )
    s.add_argument("target", metavar="MODEL", help="built-in model name or diffusers folder")
    _add_calibration_args(s)
    _add_layer_args(s)
    add_mixed_args(s)
    s.add_argument("--out", type=Path, default=None, help="output folder (default out/sensitivity-<model>)")
    s.add_argument("--top", type=non_negative_int, default=20, help="table rows to print, most sensitive first (20)")
    _add_export(sub)
    i = sub.add_parser(
        "inspect",
        help="summarize a bundle (components, layers by bit-width and role, sizes, BOS) or an ONNX export "
        "(graphs, opset, export checks, sizes); verifies every file first",
    )
    i.add_argument("bundle", metavar="BUNDLE", type=Path, help="bundle directory or ONNX export folder")
    i.add_argument("--json", action="store_true", help="print the summary as JSON")
    return parser
