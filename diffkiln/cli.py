"""The ``diffkiln`` command line. Thin: it parses arguments and calls the Python API.

Errors that are the user's to fix (unknown model, missing folder, empty prompt list, bad
numbers) print one ``error: ...`` line and exit with status 2, without a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from diffkiln import __version__
from diffkiln.core.errors import BundleError, DiffkilnError, InvalidInputError

__all__ = ["main"]

_EPILOG = """examples:
  diffkiln models
  diffkiln generate shapes-unet --prompt "a red circle on the left" --out out/gen
  diffkiln report shapes-dit --eval-size 200 --out out/report-dit
  diffkiln optimize shapes-unet --recipe w8a8 --out out/shapes-unet-w8a8
  diffkiln optimize shapes-unet --recipe mixed --weight-bits 4 --out out/shapes-unet-mixed4
  diffkiln sensitivity shapes-unet --out out/sens-unet
  diffkiln inspect out/shapes-unet-w8a8
  diffkiln generate out/shapes-unet-w8a8 --prompt "a blue square at the top"
"""


def _bounded(cast: Callable[[str], Any], lower: float, strict: bool, what: str) -> Callable[[str], Any]:
    """An argparse type: ``cast`` the text and require it above (``strict``) or at least ``lower``."""

    def parse(text: str) -> Any:
        try:
            value = cast(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}") from None
        if value < lower or (strict and value == lower):
            raise argparse.ArgumentTypeError(f"must be {what}, got {value}")
        return value

    return parse


_positive_int = _bounded(int, 0, True, "a positive integer")
_non_negative_int = _bounded(int, 0, False, "a non-negative integer")
_non_negative_float = _bounded(float, 0.0, False, "a number >= 0")


def _number_list(cast: Callable[[str], Any], example: str) -> Callable[[str], tuple[Any, ...]]:
    """An argparse type: comma-separated numbers, e.g. ``2,4,8,16``, each parsed by ``cast``."""

    def parse(text: str) -> tuple[Any, ...]:
        try:
            values = tuple(cast(v) for v in text.split(",") if v.strip())
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"must be comma-separated numbers such as {example}, got {text!r}"
            ) from None
        if not values:
            raise argparse.ArgumentTypeError("needs at least one value")
        return values

    return parse


_int_list = _number_list(int, "2,4,8,16")
_float_list = _number_list(float, "3,4,5,6,8")


def _add_mixed_args(p: argparse.ArgumentParser) -> None:
    """Options of the mixed-precision search shared by ``optimize`` and ``sensitivity``."""
    p.add_argument(
        "--weight-candidates",
        type=_int_list,
        default=(2, 4, 8, 16),
        metavar="LIST",
        help="mixed: weight bit-widths to choose from, among 2,3,4,8,16 (16 = keep in FP; 3-bit codes are "
        "packed eight per three bytes; default 2,4,8,16)",
    )
    p.add_argument(
        "--weight-group-size",
        type=_positive_int,
        default=None,
        metavar="G",
        help="mixed: store 4-, 3- and 2-bit weights in two-level groups of G inputs (a power of two, e.g. 64): an "
        "integer multiplier per group on the per-channel scale, unpacked to int8 codes for the same integer GEMM "
        "(default: per channel)",
    )
    p.add_argument(
        "--content-layers",
        action="append",
        default=[],
        metavar="GLOB",
        help="mixed: force layers into the content group (scored by final-image SSIM) (repeatable)",
    )
    p.add_argument(
        "--quality-layers",
        action="append",
        default=[],
        metavar="GLOB",
        help="mixed: force layers into the quality group (scored by denoiser-output SQNR) (repeatable)",
    )
    p.add_argument(
        "--sensitivity-prompts",
        type=_positive_int,
        default=4,
        help="mixed: calibration prompts each sensitivity trial generates (default 4)",
    )
    p.add_argument(
        "--workers", type=_positive_int, default=1, help="mixed: processes for the sensitivity trials (default 1)"
    )


def _add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--steps", type=_positive_int, help="denoising steps (default: the model's, 20 for built-ins)")
    p.add_argument(
        "--guidance",
        type=_non_negative_float,
        help="classifier-free guidance scale (default: the model's, 5.0)",
    )
    p.add_argument("--seed", type=_non_negative_int, default=0, help="base seed; image i uses seed+i (default 0)")
    p.add_argument("--batch-size", type=_positive_int, default=50, help="prompts per pipeline call (default 50)")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda (default cpu)")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="diffkiln",
        description="diffkiln: an offline compiler for diffusion models. TARGET is a built-in model "
        "name (see `diffkiln models`) or a local diffusers pipeline folder.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"diffkiln {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    sub.add_parser("models", help="list the built-in models, one per line")

    g = sub.add_parser(
        "generate",
        help="generate images from prompts",
        description="Generate one PNG per prompt. Deterministic for a seed: image i uses seed+i.",
    )
    g.add_argument("target", metavar="TARGET", help="built-in model name or diffusers folder")
    g.add_argument("--prompt", action="append", default=[], metavar="TEXT", help="a prompt (repeatable)")
    g.add_argument("--prompts", type=Path, metavar="FILE", help="file with one prompt per line ('#' comments)")
    g.add_argument("--out", type=Path, default=Path("out/generate"), help="output folder (default out/generate)")
    _add_sampling_args(g)

    r = sub.add_parser(
        "report",
        help="evaluate a model: content accuracy, images, report.json and report.html",
        description="Generate evaluation images, judge them, and write DIR/report.json and a "
        "self-contained DIR/report.html. Built-in shapes models are scored on three sets: "
        "single objects in seen compositions, in held-out compositions, and two-object scenes.",
    )
    r.add_argument("target", metavar="TARGET", help="built-in model name or diffusers folder")
    src = r.add_mutually_exclusive_group()
    src.add_argument("--eval-size", type=_positive_int, default=200, help="prompts per set (default 200)")
    src.add_argument("--eval-prompts", type=Path, metavar="FILE", help="evaluate these prompts instead")
    r.add_argument(
        "--judge",
        choices=["auto", "shapes", "none"],
        default="auto",
        help="content judge: auto uses the built-in model's own; 'shapes' for a copy of a shapes model",
    )
    r.add_argument("--out", type=Path, default=None, help="output folder (default out/report-<target>)")
    r.add_argument(
        "--baseline",
        metavar="MODEL",
        help="for a bundle: the FP model to compare with (default: the source recorded in the bundle)",
    )
    r.add_argument(
        "--no-bos-comparison",
        action="store_true",
        help="for a bundle with BOS-aware rows: skip rebuilding it without BOS-awareness for comparison",
    )
    r.add_argument(
        "--fail-on-regression",
        type=Path,
        metavar="OLD_REPORT.json",
        help="exit with status 3 when quality falls below this earlier report beyond the tolerance",
    )
    r.add_argument(
        "--tolerance",
        type=_non_negative_float,
        default=0.02,
        help="allowed drop of each content accuracy for --fail-on-regression (default 0.02)",
    )
    r.add_argument(
        "--sqnr-tolerance",
        type=_non_negative_float,
        default=1.0,
        help="allowed drop of latent SQNR in dB for --fail-on-regression (default 1.0)",
    )
    _add_sampling_args(r)

    o = sub.add_parser(
        "optimize",
        help="calibrate, plan and freeze a model into a deployable bundle",
        description="Calibrate MODEL on prompts over its sampler's real timesteps, plan the "
        "quantization and write a self-contained bundle that `diffkiln generate|report|inspect BUNDLE` "
        "and diffkiln.runtime.load() run with integer kernels. Recipes: w8a8 (int8 per-channel "
        "weights, int8 activations, BOS-aware text rows); mixed (per-layer 2/3/4/8/16-bit weights "
        "chosen by integer programming from measured sensitivities, 4-, 3- and 2-bit weights stored "
        "and kept packed; --weight-bits is then an average, e.g. 4).",
    )
    o.add_argument("target", metavar="MODEL", help="built-in model name or diffusers folder")
    o.add_argument("--recipe", choices=["w8a8", "mixed"], default="w8a8", help="compression recipe (default w8a8)")
    cal = o.add_mutually_exclusive_group()
    cal.add_argument("--calib-prompts", type=Path, metavar="FILE", help="calibration prompts, one per line")
    cal.add_argument("--calib-size", type=_positive_int, default=32, help="default calibration prompts (32)")
    o.add_argument("--steps", type=_positive_int, help="sampler steps for calibration (default: the model's)")
    o.add_argument("--guidance", type=_non_negative_float, help="guidance for calibration (default: the model's)")
    o.add_argument(
        "--include",
        action="append",
        default=[],
        metavar="GLOB",
        help="quantize layers matching GLOB although kept in FP by default (repeatable)",
    )
    o.add_argument(
        "--exclude",
        action="append",
        default=[],
        metavar="GLOB",
        help="keep layers matching GLOB in floating point (repeatable)",
    )
    o.add_argument("--no-bos", action="store_true", help="disable BOS-aware text rows")
    o.add_argument(
        "--act-mode",
        choices=["static", "dynamic"],
        default="static",
        help="static per-tensor (calibrated) or dynamic per-token activations (default static)",
    )
    o.add_argument(
        "--weight-bits",
        type=float,
        default=8,
        metavar="BITS",
        help="w8a8: the weight grid, 8 or 7 (default 8); 7 keeps int8 storage on [-63, 63], the only way, "
        "with 8-bit activations, to run oneDNN's fast int8 kernels exactly on x86 CPUs without VNNI (AVX2). "
        "mixed: the average weight bits over all Linear/Conv2d parameters, FP layers counting 16 (e.g. 4)",
    )
    o.add_argument(
        "--act-bits",
        type=float,
        default=None,
        metavar="BITS",
        help="w8a8: the static activation grid, 8 or 7 (default 8; 7 is the other way to the AVX2 fast path). "
        "mixed: the average activation bits (default: 8-bit activations on every quantized layer)",
    )
    o.add_argument(
        "--weight-budget",
        choices=["stored", "codes"],
        default="stored",
        help="mixed: what --weight-bits averages: stored = the bits the bundle stores per weight, float16 "
        "scales and group multipliers included (a budget in weight bytes); codes = code bits only, as "
        "MixDQ counts, scales on top (default stored)",
    )
    o.add_argument(
        "--act-candidates",
        type=_int_list,
        default=(8, 16),
        metavar="LIST",
        help="mixed: activation bit-widths to choose from with --act-bits, 16 = weight-only (default 8,16)",
    )
    _add_mixed_args(o)
    o.add_argument(
        "--float-storage",
        choices=["lossless", "float16"],
        help="how the bundle stores weight scales, biases, BOS rows and FP layers: lossless (exact) or "
        "float16, as an FP16 checkpoint stores them (default: lossless for w8a8, float16 for mixed)",
    )
    o.add_argument(
        "--latency-budget",
        type=_bounded(float, 0.0, True, "a positive number of milliseconds"),
        metavar="MS",
        help="mixed: bound the summed per-call latency of the searched layers, from a per-layer table "
        "measured on this machine's CPU at each candidate width",
    )
    o.add_argument(
        "--sweep",
        type=_float_list,
        metavar="LIST",
        help="mixed: build bundles at each average weight bits (e.g. 3,4,5,6,8) plus uniform W4A8 and W8A8 "
        "references under --out, evaluate them and write --out/sweep.json and sweep.html (a Pareto chart "
        "and a per-layer bit map)",
    )
    o.add_argument(
        "--sweep-eval-size",
        type=_positive_int,
        default=50,
        help="mixed --sweep: evaluation prompts per set (default 50)",
    )
    o.add_argument(
        "--smooth",
        choices=["auto", "all", "off"],
        default="auto",
        help="SmoothQuant the input channels of Linear layers: auto = layers whose largest input "
        "channel exceeds 8x the median one, all = every Linear, off = none (default auto)",
    )
    o.add_argument("--smooth-alpha", type=float, default=0.5, help="smoothing strength in (0, 1) (default 0.5)")
    o.add_argument(
        "--timestep-aware",
        action="store_true",
        help="one static activation range per sampler step (chosen from that step's calibration samples); "
        "the runtime uses the range of the nearest calibrated timestep",
    )
    o.add_argument(
        "--requantize-conv-outputs",
        action="store_true",
        help="w8a8: round each integer convolution's output onto a calibrated int8 grid, as onnxruntime's "
        "quantize_static does, so that onnxruntime runs the convolutions as int8 QLinearConv (full-size SD1.5 UNet: "
        "0.58x the time of onnxruntime's own quantize_static), at the cost of one more rounding per convolution",
    )
    o.add_argument("--out", type=Path, required=True, metavar="BUNDLE", help="bundle directory to write")
    o.add_argument("--overwrite", action="store_true", help="replace an existing bundle directory")
    o.add_argument("--cache-dir", type=Path, help="calibration cache (default $DIFFKILN_CACHE or ~/.cache/diffkiln)")
    o.add_argument("--seed", type=_non_negative_int, default=0, help="calibration seed (default 0)")
    o.add_argument("--no-progress", action="store_true", help="hide progress bars")

    s = sub.add_parser(
        "sensitivity",
        help="measure each layer's sensitivity to 2/3/4/8-bit weights and 8-bit activations",
        description="Run (or, when cached, read back) the metric-decoupled sensitivity analysis of the "
        "mixed recipe alone: each layer quantized by itself, content layers (cross-attention and "
        "feed-forward) scored by SSIM of the final images against FP, the rest by SQNR of the denoiser "
        "output. The trials are SIMULATED (fake-quant); results are cached and resume after an "
        "interruption. Prints a table and writes DIR/sensitivity.json and DIR/sensitivity.html.",
    )
    s.add_argument("target", metavar="MODEL", help="built-in model name or diffusers folder")
    scal = s.add_mutually_exclusive_group()
    scal.add_argument("--calib-prompts", type=Path, metavar="FILE", help="calibration prompts, one per line")
    scal.add_argument("--calib-size", type=_positive_int, default=32, help="default calibration prompts (32)")
    s.add_argument("--steps", type=_positive_int, help="sampler steps (default: the model's)")
    s.add_argument("--guidance", type=_non_negative_float, help="guidance (default: the model's)")
    s.add_argument("--exclude", action="append", default=[], metavar="GLOB", help="keep layers in FP (repeatable)")
    _add_mixed_args(s)
    s.add_argument("--out", type=Path, default=None, help="output folder (default out/sensitivity-<model>)")
    s.add_argument("--cache-dir", type=Path, help="cache (default $DIFFKILN_CACHE or ~/.cache/diffkiln)")
    s.add_argument("--seed", type=_non_negative_int, default=0, help="calibration seed (default 0)")
    s.add_argument("--top", type=_non_negative_int, default=20, help="table rows to print, most sensitive first (20)")
    s.add_argument("--no-progress", action="store_true", help="hide progress bars")

    e = sub.add_parser(
        "export",
        help="export a bundle to ONNX (QDQ, int8/int4 initializers) or the MindIE-SD / msModelSlim format",
        description="--format onnx: one ONNX model per component in DIR (denoiser.onnx with QuantizeLinear/"
        "DequantizeLinear around every quantized MatMul and Conv and int8 weight initializers, INT4 for 4- and "
        "2-bit layers at opset >= 21; text_encoder*.onnx; vae_decoder.onnx), dynamic batch and resolution axes "
        "where the model allows, checked with onnx.checker (full_check), plus the tokenizers, scheduler and a "
        "manifest; run it with diffkiln.runtime.load(DIR, backend='onnxruntime'). "
        "--format mindiesd: the denoiser as quant_model_weight_w8a8.safetensors + "
        "quant_model_description_w8a8.json (w8a8_dynamic for dynamic bundles), the files MindIE-SD's "
        "quantize(model, quant_des_path) loads. See docs/onnx-export.md and docs/mindiesd-export.md.",
    )
    e.add_argument("bundle", metavar="BUNDLE", type=Path, help="bundle directory")
    e.add_argument("--format", choices=["onnx", "mindiesd"], default="onnx", help="export format (default onnx)")
    e.add_argument("--out", type=Path, required=True, metavar="DIR", help="output folder (written atomically)")
    e.add_argument(
        "--opset",
        type=_positive_int,
        default=21,
        help="onnx: ONNX opset, >= 13 (default 21); >= 21 stores 4-/3-/2-bit codes as INT4, >= 25 stores 2-bit "
        "codes as INT2 (onnxruntime 1.32 runs both; check your runtime's opset support)",
    )
    e.add_argument("--static-shapes", action="store_true", help="onnx: fix every axis to the recorded call's shapes")
    e.add_argument(
        "--compute",
        choices=["qdq", "integer"],
        default="qdq",
        help="onnx: how quantized layers compute. qdq (default): QuantizeLinear/DequantizeLinear around float "
        "MatMul/Conv, the form TensorRT and Ascend ATC fuse; integer: MatMulInteger/ConvInteger with int32 sums "
        "and one scale multiply, the torch runtime's own arithmetic (closest onnxruntime parity)",
    )
    e.add_argument(
        "--matmulnbits",
        action="store_true",
        help="onnx: store 4- and 2-bit Linear weights as onnxruntime's com.microsoft.MatMulNBits (packed blocks, "
        "run by its low-bit kernels; grouped weights stay 4-/2-bit) instead of standard INT4/INT2 "
        "DequantizeLinear; for onnxruntime only",
    )
    e.add_argument("--denoiser-only", action="store_true", help="onnx: skip the text encoders and the VAE decoder")
    e.add_argument(
        "--keep-fp",
        action="store_true",
        help="a layer the format cannot express is kept in float (warned, and listed in the export's metadata) "
        "instead of failing the export",
    )
    e.add_argument(
        "--dtype",
        choices=["float16", "bfloat16"],
        default="float16",
        help="mindiesd: float dtype of input scales/offsets and FLOAT tensors (default float16)",
    )
    e.add_argument("--overwrite", action="store_true", help="replace an existing DIR")
    e.add_argument("--no-progress", action="store_true", help="hide the progress bar")

    i = sub.add_parser("inspect", help="summarize a bundle: components, layers by bit-width, sizes, BOS")
    i.add_argument("bundle", metavar="BUNDLE", type=Path, help="bundle directory")
    i.add_argument("--json", action="store_true", help="print the summary as JSON")
    return parser


def _cmd_models() -> int:
    from diffkiln.zoo.registry import BUILTIN_MODELS

    for m in BUILTIN_MODELS.values():
        print(
            f"{m.name:<12} {m.pipeline_class:<26} steps={m.default_steps} guidance={m.default_guidance}  "
            f"{m.description}"
        )
    return 0


def _cmd_generate(a: argparse.Namespace) -> int:
    from diffkiln.generation import GenerateConfig, generate, load_pipeline, read_prompts, save_images
    from diffkiln.zoo.registry import resolve_target

    prompts = list(a.prompt) + (read_prompts(a.prompts) if a.prompts else [])
    if not prompts:
        raise InvalidInputError("no prompts given; pass --prompt TEXT (repeatable) or --prompts FILE")
    config = GenerateConfig(a.steps, a.guidance, a.seed, a.batch_size, not a.no_progress)
    target = resolve_target(a.target)
    pipe = load_pipeline(target, a.device)
    result = generate(pipe, prompts, config, target)
    paths = save_images(result, a.out)
    for p in paths:
        print(p)
    print(
        f"wrote {len(paths)} image(s) to {a.out} (steps={result.steps}, guidance={result.guidance}, seed={result.seed})"
    )
    return 0


def _cmd_report(a: argparse.Namespace) -> int:
    from diffkiln.report import ReportConfig, report
    from diffkiln.zoo.registry import JudgeKind

    judge = None if a.judge == "auto" else JudgeKind(a.judge)
    config = ReportConfig(
        eval_size=a.eval_size,
        eval_prompts=a.eval_prompts,
        steps=a.steps,
        guidance=a.guidance,
        seed=a.seed,
        judge=judge,
        batch_size=a.batch_size,
        device=a.device,
        progress=not a.no_progress,
        baseline=a.baseline,
        bos_comparison=not a.no_bos_comparison,
    )
    old_report = _read_old_report(a.fail_on_regression) if a.fail_on_regression else None
    if a.eval_prompts is not None:
        from diffkiln.generation import read_prompts

        read_prompts(a.eval_prompts)  # fail on a bad file before loading the model
    out = a.out or Path("out") / f"report-{Path(a.target).name}"
    json_path, html_path = report(a.target, config, out)
    q = json.loads(json_path.read_text()).get("quality")
    if q:
        print(
            f"content_accuracy={_fmt(q['content_accuracy'])} heldout={_fmt(q['content_accuracy_heldout'])} "
            f"pairs={_fmt(q['content_accuracy_pairs'])} (n={q['n_prompts']})"
        )
    print(f"wrote {json_path} and {html_path}")
    if old_report is not None:
        from diffkiln.report.compare import regressions

        problems = regressions(json.loads(json_path.read_text()), old_report, a.tolerance, a.sqnr_tolerance)
        for p in problems:
            print(f"regression: {p}", file=sys.stderr)
        if problems:
            return 3
        print(f"no regression against {a.fail_on_regression}")
    return 0


def _read_old_report(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InvalidInputError(f"--fail-on-regression: {path} does not exist") from None
    except (OSError, ValueError) as exc:
        raise InvalidInputError(f"--fail-on-regression: {path} is not a readable report.json ({exc})") from None
    if not isinstance(data, dict) or "report_version" not in data:
        raise InvalidInputError(f"--fail-on-regression: {path} is not a diffkiln report.json")
    return data


def _cmd_optimize(a: argparse.Namespace) -> int:
    from diffkiln.export import FloatStorage
    from diffkiln.optimize import OptimizeConfig, optimize
    from diffkiln.optimizer import ActMode, Recipe, SmoothMode
    from diffkiln.optimizer.mixed import WeightBudget

    if a.calib_prompts is not None:
        from diffkiln.generation import read_prompts

        read_prompts(a.calib_prompts)  # fail on a bad file before loading the model
    config = OptimizeConfig(
        out=a.out,
        recipe=Recipe(a.recipe),
        calib_prompts=a.calib_prompts,
        calib_size=a.calib_size,
        steps=a.steps,
        guidance=a.guidance,
        include=tuple(a.include),
        exclude=tuple(a.exclude),
        bos_aware=not a.no_bos,
        act_mode=ActMode(a.act_mode),
        weight_bits=a.weight_bits,
        act_bits=a.act_bits,
        weight_candidates=tuple(a.weight_candidates),
        weight_group_size=a.weight_group_size,
        weight_budget=WeightBudget(a.weight_budget),
        act_candidates=tuple(a.act_candidates),
        content_layers=tuple(a.content_layers),
        quality_layers=tuple(a.quality_layers),
        sensitivity_prompts=a.sensitivity_prompts,
        workers=a.workers,
        latency_budget_ms=a.latency_budget,
        float_storage=None if a.float_storage is None else FloatStorage(a.float_storage),
        smooth=SmoothMode(a.smooth),
        smooth_alpha=a.smooth_alpha,
        timestep_aware=a.timestep_aware,
        requantize_conv_outputs=a.requantize_conv_outputs,
        overwrite=a.overwrite,
        cache_dir=a.cache_dir,
        seed=a.seed,
        progress=not a.no_progress,
    )
    if a.sweep:
        from diffkiln.report.sweep import SweepConfig, sweep

        if config.recipe is not Recipe.MIXED:
            raise InvalidInputError("--sweep needs --recipe mixed")
        try:
            sweep_config = SweepConfig(budgets=tuple(a.sweep), eval_size=a.sweep_eval_size)
        except ValueError as exc:
            raise InvalidInputError(str(exc)) from None
        json_path, html_path = sweep(a.target, config, sweep_config)
        for row in json.loads(json_path.read_text())["rows"]:
            acc = (row.get("quality") or {}).get("content_accuracy")
            sqnr = (row.get("fidelity") or {}).get("latent_sqnr_db")
            print(
                f"{row['name']:<14} avg W bits {row['avg_weight_bits']:5.2f}  content acc {_fmt(acc)}  "
                f"latent SQNR {_fmt(sqnr)} dB  stored/FP16 {_fmt(row.get('size_ratio_vs_fp16'))}"
            )
        print(f"wrote {json_path} and {html_path}")
        return 0
    bundle = optimize(a.target, config)
    print(f"wrote bundle {bundle}")
    return _cmd_inspect(argparse.Namespace(bundle=bundle, json=False))


def _cmd_sensitivity(a: argparse.Namespace) -> int:
    from diffkiln.optimize import OptimizeConfig, sensitivity
    from diffkiln.optimizer import Recipe
    from diffkiln.report.sensitivity_html import format_sensitivity_table

    if a.calib_prompts is not None:
        from diffkiln.generation import read_prompts

        read_prompts(a.calib_prompts)
    out = a.out or Path("out") / f"sensitivity-{Path(a.target).name}"
    config = OptimizeConfig(
        out=out,
        recipe=Recipe.MIXED,
        weight_bits=4.0,
        calib_prompts=a.calib_prompts,
        calib_size=a.calib_size,
        steps=a.steps,
        guidance=a.guidance,
        exclude=tuple(a.exclude),
        weight_candidates=tuple(a.weight_candidates),
        weight_group_size=a.weight_group_size,
        content_layers=tuple(a.content_layers),
        quality_layers=tuple(a.quality_layers),
        sensitivity_prompts=a.sensitivity_prompts,
        workers=a.workers,
        cache_dir=a.cache_dir,
        seed=a.seed,
        progress=not a.no_progress,
    )
    table, json_path, html_path = sensitivity(a.target, config)
    print(format_sensitivity_table(table, a.top))
    print(f"wrote {json_path} and {html_path}")
    return 0


def _cmd_export(a: argparse.Namespace) -> int:
    from diffkiln.export.mindiesd import MindieExportConfig, MindieExportError, MindieFloat, export_mindiesd
    from diffkiln.export.onnx import OnnxCompute, OnnxExportConfig, OnnxExportError, export_onnx

    try:
        if a.format == "mindiesd":
            out = export_mindiesd(a.bundle, MindieExportConfig(a.out, MindieFloat(a.dtype), a.keep_fp, a.overwrite))
        else:
            config = OnnxExportConfig(
                a.out,
                opset=a.opset,
                dynamic=not a.static_shapes,
                keep_fp=a.keep_fp,
                components=not a.denoiser_only,
                overwrite=a.overwrite,
                progress=not a.no_progress,
                compute=OnnxCompute(a.compute),
                matmulnbits=a.matmulnbits,
            )
            out = export_onnx(a.bundle, config)
    except (OnnxExportError, MindieExportError, ValueError) as exc:
        raise InvalidInputError(str(exc)) from None
    for path in sorted(out.glob("*")):
        if path.suffix in (".onnx", ".safetensors", ".data"):
            print(f"wrote {path} ({path.stat().st_size / 1e6:.2f} MB)")
    return 0


def _cmd_inspect(a: argparse.Namespace) -> int:
    from diffkiln.runtime.inspect import summarize

    summary = summarize(a.bundle)
    if a.json:
        print(json.dumps(summary, indent=2))
        return 0
    print(f"bundle   {a.bundle}  (format v{summary['version']}, recipe {summary['recipe']})")
    print(f"source   {summary['source']}")
    print(f"pipeline {summary['pipeline']}  denoiser={summary['denoiser']}")
    print(f"components {', '.join(summary['components'])}")
    counts = ", ".join(f"{k}: {v}" for k, v in summary["layers_by_bits"].items())
    print(
        f"layers   {counts}  (avg weight bits {summary['avg_weight_bits']:.2f}, "
        f"avg act bits {summary['avg_act_bits']:.2f}; SmoothQuant on {summary['smoothed_layers']}"
        + (f"; int8 outputs on {summary['requantized_outputs']}" if summary["requantized_outputs"] else "")
        + ")"
    )
    print(
        f"sizes    denoiser {summary['denoiser_bytes'] / 1e6:.2f} MB stored "
        f"(FP16 equivalent {summary['denoiser_fp16_bytes'] / 1e6:.2f} MB, "
        f"{summary['denoiser_bytes'] / max(summary['denoiser_fp16_bytes'], 1):.2f}x); "
        f"bundle {summary['bundle_bytes'] / 1e6:.2f} MB"
    )
    if summary["derived_buffers"]:
        print(f"derived  {', '.join(summary['derived_buffers'])} (rebuilt from the config at load, not stored)")
    print(
        f"bos      positions {summary['bos']['positions']}"
        + (
            f"  |BOS| {summary['bos'].get('bos_absmax'):.1f} vs others <= "
            f"{summary['bos'].get('other_tokens_absmax'):.1f}"
            if summary["bos"].get("bos_absmax")
            else ""
        )
    )
    print(f"build    {json.dumps(summary['build_metrics'])}")
    return 0


def _fmt(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.3f}"


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``diffkiln`` console script; returns the exit status."""
    args = _parser().parse_args(argv)
    try:
        if args.command == "models":
            return _cmd_models()
        if args.command == "generate":
            return _cmd_generate(args)
        if args.command == "optimize":
            return _cmd_optimize(args)
        if args.command == "inspect":
            return _cmd_inspect(args)
        if args.command == "sensitivity":
            return _cmd_sensitivity(args)
        if args.command == "export":
            return _cmd_export(args)
        return _cmd_report(args)
    except (DiffkilnError, BundleError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
