"""ONNX and W8A8 peers, side by side in one run on a built-in model's denoiser.

Builds diffkiln's W8A8 bundle (``--float-storage float16``, default calibration prompts), then:

* file size: diffkiln's ONNX denoiser (W8A8 and, with ``--mixed-bundle``, a mixed bundle)
  against the FP16 and FP32 ONNX of the float denoiser (same exporter, same passes) and against
  onnxruntime's ``quantize_static`` output (QDQ, per-channel int8 weights, calibrated on the
  denoiser inputs of the same calibration prompts, steps and guidance);
* the same W8A8 bundle exported with ``--compute integer`` (MatMulInteger / ConvInteger);
* onnxruntime CPU latency of one denoiser call (the CFG batch of 2), median of ``--repeat``, with
  graph optimizations on and off;
* quality: the latent SQNR against the float pipeline over ``--eval-prompts`` prompts at the
  model's default steps, with each denoiser swapped into the same pipeline;
* the torch side: diffkiln's integer runtime against optimum-quanto W8A8 (qint8 weights, qint8
  activations calibrated on the same prompts, frozen), eager, latency and the same quality.

Usage:
    python tools/bench_onnx.py --model shapes-unet --work /tmp/bench-onnx [--mixed-bundle B]
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
import warnings
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


class _SessionDenoiser:
    """A denoiser-shaped callable over an onnxruntime session (inputs by ONNX input name)."""

    def __init__(self, path: Path, optimize: bool, like: Any, fold_conv_weights: bool = False):
        import onnxruntime as ort

        from diffkiln.runtime.onnxruntime_backend import open_session

        options = ort.SessionOptions()
        options.log_severity_level = 3
        # Idle sessions must not spin on the cores the other variants are timed on.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        if not optimize:
            options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        # open_session: where onnxruntime's optimizer breaks a graph, built without that rewrite.
        # fold_conv_weights: what diffkiln's onnxruntime backend does when it optimizes on CPU.
        self.session = open_session(path, options, ["CPUExecutionProvider"], fold_conv_weights)
        self.inputs = {i.name: i for i in self.session.get_inputs()}
        self.like = like
        self.config = like.config

    def feeds(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
        import inspect

        import numpy as np

        bound = inspect.signature(self.like.forward).bind_partial(*args, **kwargs).arguments
        out = {}
        for name, info in self.inputs.items():
            value = bound[name].detach().numpy()
            out[name] = value.astype(np.int64 if "int64" in info.type else np.float32)
        return out

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        import torch

        kwargs.pop("return_dict", None)
        sample = torch.from_numpy(self.session.run(None, self.feeds(args, kwargs))[0])
        return (sample,)


def _latents(pipe: Any, prompts: list[str], steps: int, guidance: float) -> Any:
    import torch

    pipe.set_progress_bar_config(disable=True)
    out = []
    for i, p in enumerate(prompts):
        g = torch.Generator().manual_seed(1000 + i)
        with torch.no_grad():
            out.append(
                pipe(p, num_inference_steps=steps, guidance_scale=guidance, output_type="latent", generator=g).images
            )
    return torch.cat(out)


def _with_denoiser(pipe: Any, denoiser: Any) -> Any:
    clone = copy.copy(pipe)
    clone.unet = denoiser  # bypasses register_modules: the pipeline's call reads self.unet
    return clone


def _calibration_inputs(pipe: Any, prompts: list[str], steps: int, guidance: float) -> list[dict[str, Any]]:
    import inspect

    import torch

    from diffkiln.core.hooks import recording_calls

    pipe.set_progress_bar_config(disable=True)
    with recording_calls("bench.calib", pipe.unet) as calls, torch.no_grad():
        for i, p in enumerate(prompts):
            pipe(p, num_inference_steps=steps, guidance_scale=guidance, output_type="latent",
                 generator=torch.Generator().manual_seed(i))  # fmt: skip
    sig = inspect.signature(pipe.unet.forward)
    return [
        {k: v for k, v in sig.bind_partial(*a, **kw).arguments.items() if isinstance(v, torch.Tensor)}
        for a, kw in calls
    ]


def _export_float(pipe: Any, call: dict[str, Any], out: Path, half: bool) -> Path:
    """The float denoiser through diffkiln's exporter (same passes and checks as a bundle's)."""
    import torch

    from diffkiln.export.onnx import OnnxExportConfig, export_module_onnx

    module = copy.deepcopy(pipe.unet)
    if half:
        module = module.half()
        call = {k: v.half() if v.is_floating_point() else v for k, v in call.items()}
    path = out / ("denoiser-fp16.onnx" if half else "denoiser-fp32.onnx")
    with torch.no_grad():
        # A plain float32 file (no float16 initializers + Cast): what quantize_static expects.
        export_module_onnx(module, call, path, OnnxExportConfig(out), float16=half)
    return path


def _ort_quantize_static(fp32: Path, calib: list[dict[str, Any]], out: Path, matmul_conv_only: bool) -> Path:
    """onnxruntime's quantize_static, QDQ, per-channel int8 weights, int8 activations (MinMax).

    ``matmul_conv_only``: quantize only MatMul and Conv (the ops diffkiln quantizes) instead of
    every op onnxruntime can quantize, with ``reduce_range`` (7-bit weights), which onnxruntime
    recommends for x86 CPUs without VNNI.
    """
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.it = iter([{k: v.numpy() for k, v in c.items()} for c in calib])

        def get_next(self) -> dict[str, Any] | None:
            return next(self.it, None)

    pre = out / "denoiser-fp32-pre.onnx"
    if not pre.exists():
        quant_pre_process(str(fp32), str(pre), skip_symbolic_shape=True)
    path = out / f"denoiser-ort-quantize-static{'-matmul-conv-rr' if matmul_conv_only else ''}.onnx"
    ops: dict[str, Any] = {"op_types_to_quantize": ["MatMul", "Conv"], "reduce_range": True} if matmul_conv_only else {}
    quantize_static(str(pre), str(path), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QInt8, weight_type=QuantType.QInt8, **ops)  # fmt: skip
    return path


def _quanto(pipe: Any, calib_prompts: list[str], steps: int, guidance: float) -> Any:
    import torch
    from optimum.quanto import Calibration, freeze, qint8, quantize

    unet = copy.deepcopy(pipe.unet)
    quantize(unet, weights=qint8, activations=qint8)
    calib_pipe = _with_denoiser(pipe, unet)
    calib_pipe.set_progress_bar_config(disable=True)
    with Calibration(), torch.no_grad():
        for i, p in enumerate(calib_prompts):
            calib_pipe(p, num_inference_steps=steps, guidance_scale=guidance, output_type="latent",
                       generator=torch.Generator().manual_seed(i))  # fmt: skip
    freeze(unet)
    return unet


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="shapes-unet", help="a built-in UNet model (default shapes-unet)")
    parser.add_argument("--work", type=Path, required=True, help="scratch and results folder")
    parser.add_argument("--calib-prompts", type=int, default=32, help="calibration prompts (default 32)")
    parser.add_argument("--eval-prompts", type=int, default=8, help="quality prompts (default 8)")
    parser.add_argument("--repeat", type=int, default=20, help="timed denoiser calls per variant (default 20)")
    parser.add_argument("--mixed-bundle", type=Path, default=None, help="also size a mixed bundle's ONNX export")
    parser.add_argument("--skip-torch", action="store_true", help="skip the torch variants (optimum-quanto, ...)")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")

    import torch

    from diffkiln.api import OptimizeConfig, W8A8Config, convert, optimize
    from diffkiln.core.metrics import sqnr_db
    from diffkiln.export import FloatStorage
    from diffkiln.export.onnx import OnnxCompute, OnnxExportConfig
    from diffkiln.generation import load_pipeline
    from diffkiln.runtime import load
    from diffkiln.zoo.registry import resolve_target

    def export_onnx(bundle: Path, config: Any) -> Path:
        return convert(bundle, config)

    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    builtin = resolve_target(args.model).builtin
    if builtin is None:
        parser.error(f"{args.model} is not a built-in model")
    steps, guidance = builtin.default_steps, builtin.default_guidance
    calib_prompts = builtin.calibration_prompts(args.calib_prompts) or []
    eval_prompts = (builtin.calibration_prompts(args.calib_prompts + args.eval_prompts) or [])[args.calib_prompts :]
    torch.set_num_threads(torch.get_num_threads())
    results: dict[str, Any] = {"model": args.model, "steps": steps, "guidance": guidance,
                               "threads": torch.get_num_threads(), "calib_prompts": len(calib_prompts),
                               "eval_prompts": len(eval_prompts)}  # fmt: skip

    bundles: dict[str, Path] = {}
    # 7: reduce range, for fused int8 kernels on x86 CPUs without VNNI; "8rq": convolution outputs
    # requantized (onnxruntime then runs the convolutions as QLinearConv).
    for key, bits, requantize in (("8", 8, False), ("7", 7, False), ("8rq", 8, True)):
        bundles[key] = work / f"bundle-w{bits}a8{'-rq' if requantize else ''}"
        if not bundles[key].exists():
            config = OptimizeConfig(
                out=bundles[key],
                recipe=W8A8Config(weight_bits=bits, requantize_conv_outputs=requantize),
                float_storage=FloatStorage.FLOAT16,
                calib_size=args.calib_prompts,
                progress=False,
            )
            optimize(args.model, config)
    bundle = bundles["8"]
    ours = export_onnx(bundle, OnnxExportConfig(work / "onnx-w8a8", components=False, overwrite=True)) / "denoiser.onnx"
    ours7 = export_onnx(bundles["7"], OnnxExportConfig(work / "onnx-w7a8", components=False, overwrite=True))
    ours7 = ours7 / "denoiser.onnx"
    rq = OnnxExportConfig(work / "onnx-w8a8-rq", components=False, overwrite=True)
    ours_rq = export_onnx(bundles["8rq"], rq) / "denoiser.onnx"
    integer = OnnxExportConfig(work / "onnx-w8a8-int", components=False, overwrite=True, compute=OnnxCompute.INTEGER)
    ours_int = export_onnx(bundle, integer) / "denoiser.onnx"
    pipe = load_pipeline(args.model)
    calib = _calibration_inputs(pipe, calib_prompts, steps, guidance)
    fp32 = _export_float(pipe, calib[0], work / "onnx-fp", half=False)
    fp16 = _export_float(pipe, calib[0], work / "onnx-fp", half=True)
    ort_static = _ort_quantize_static(fp32, calib, work / "onnx-fp", matmul_conv_only=False)
    ort_static_mc = _ort_quantize_static(fp32, calib, work / "onnx-fp", matmul_conv_only=True)
    files = {
        "fp32": fp32,
        "fp16": fp16,
        "diffkiln_w8a8": ours,
        "diffkiln_w7a8": ours7,
        "diffkiln_w8a8_rq": ours_rq,
        "diffkiln_w8a8_integer": ours_int,
        "ort_quantize_static": ort_static,
        "ort_quantize_static_matmul_conv_rr": ort_static_mc,
    }
    if args.mixed_bundle:
        mixed = export_onnx(args.mixed_bundle, OnnxExportConfig(work / "onnx-mixed", components=False, overwrite=True))
        files["diffkiln_mixed"] = mixed / "denoiser.onnx"
    results["size_mb"] = {k: round(p.stat().st_size / 1e6, 3) for k, p in files.items()}
    results["size_vs_fp16"] = {k: round(p.stat().st_size / fp16.stat().st_size, 3) for k, p in files.items()}

    example_kwargs = calib[len(calib) // 2]
    reference = _latents(pipe, eval_prompts, steps, guidance)
    runners: dict[str, Any] = {}  # name -> (denoiser for the pipeline, one timed call)
    failures: dict[str, str] = {}
    for name, path, optimize_graph, fold in [
        ("ort_fp32", fp32, True, False),
        ("ort_diffkiln_w8a8", ours, False, False),
        ("ort_diffkiln_w8a8_optimized", ours, True, False),
        ("ort_diffkiln_w8a8_optimized_conv_folded", ours, True, True),
        ("ort_diffkiln_w8a8_rq_optimized", ours_rq, True, True),
        ("ort_diffkiln_w7a8", ours7, False, False),
        ("ort_diffkiln_w7a8_optimized", ours7, True, False),
        ("ort_diffkiln_w8a8_integer", ours_int, False, False),
        ("ort_diffkiln_w8a8_integer_optimized", ours_int, True, False),
        ("ort_quantize_static_optimized", ort_static, True, False),
        ("ort_quantize_static", ort_static, False, False),
        ("ort_quantize_static_matmul_conv_rr_optimized", ort_static_mc, True, False),
        ("ort_quantize_static_matmul_conv_rr", ort_static_mc, False, False),
    ]:
        try:
            denoiser = _SessionDenoiser(path, optimize_graph, pipe.unet, fold)
        except Exception as exc:  # onnxruntime rejecting a model is a result of the comparison
            failures[name] = f"{type(exc).__name__}: {str(exc)[:300]}"
            print(name, "fails to load:", failures[name], flush=True)
            continue
        feeds = denoiser.feeds((), dict(example_kwargs))
        runners[name] = (denoiser, lambda d=denoiser, f=feeds: d.session.run(None, f))
    if not args.skip_torch:
        modules = {
            "torch_fp32": pipe.unet,
            "torch_diffkiln_w8a8": load(bundle, "cpu").unet,
            "torch_optimum_quanto_w8a8": _quanto(pipe, calib_prompts, steps, guidance),
        }
        for name, module in modules.items():
            runners[name] = (module, lambda m=module: m(**example_kwargs))
    variants: dict[str, Any] = {}
    for name, (denoiser, _) in runners.items():
        got = _latents(_with_denoiser(pipe, denoiser), eval_prompts, steps, guidance)
        variants[name] = {"latent_sqnr_vs_fp_db": round(sqnr_db(reference.numpy(), got.numpy()), 2)}
    # Timing interleaved: each round calls every variant once, so drift on a noisy machine hits
    # all of them alike; the median over rounds is reported.
    times: dict[str, list[float]] = {name: [] for name in runners}
    with torch.no_grad():
        for _, call in runners.values():
            call()  # warm-up
        for _ in range(args.repeat):
            for name, (_, call) in runners.items():
                t0 = time.perf_counter()
                call()
                times[name].append((time.perf_counter() - t0) * 1e3)
    for name in runners:
        variants[name]["ms_per_call"] = round(statistics.median(times[name]), 2)
        print(name, variants[name], flush=True)
    results["variants"] = variants
    results["failures"] = failures
    (work / "results.json").write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
