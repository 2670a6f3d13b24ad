"""diffkiln's W8A8 ONNX against onnxruntime's own ``quantize_static`` on a full-size denoiser.

The full-size SD1.5 UNet (about 860M parameters, random weights from ``diffkiln.zoo.architectures``)
has no pipeline to calibrate through, so both quantizers calibrate on the same denoiser calls:
random latents and text states at four spread timesteps, the CFG batch of 2 (``--latent`` x
``--latent`` latents; default 32: at 64, onnxruntime's calibration session for ``quantize_static``
ran out of 23 GB of memory). Each stage runs in its own process (the FP32 weights are 3.4 GB):

1. ``float``: the FP32 and FP16 ONNX of the float denoiser (diffkiln's exporter and passes, fixed
   shapes), and the float torch outputs on held-out calls (the quality reference);
2. ``diffkiln``: calibrate (``--samples-per-step`` values kept per layer and call), plan W8A8
   (defaults) and freeze in memory with diffkiln's own modules, then export the integer layers as
   QDQ with int8 initializers; ``diffkiln-rq``: the same with ``requantize_conv_outputs`` (each
   convolution's output on a calibrated int8 grid: onnxruntime runs them as QLinearConv);
   ``diffkiln-integer``: the same as ``diffkiln`` with ``compute="integer"`` (MatMulInteger /
   ConvInteger);
3. ``ort``: ``quantize_static`` of the FP32 ONNX (QDQ, per-channel int8 weights, int8 activations,
   MinMax) on the same calibration calls, both the default op set and MatMul/Conv only with
   reduce_range (as tools/bench_onnx.py);
4. ``time``: every file in one onnxruntime CPU session after another: latency of one call (median
   of ``--repeat``), and the output SQNR against the float torch outputs on the held-out calls;
5. ``memory``: each of those files in a fresh process: resident memory (RSS) after building the
   session and after one call, and the process's peak, against the process before the session;
6. ``pairs``: the files the comparison is about (diffkiln as its backend opens it, diffkiln-rq,
   and ``quantize_static``'s tuned output) open side by side and timed in turns, ``--repeat``
   rounds: the median of each and of the per-round ratios, robust to the machine's drift.

Calibration samples: diffkiln keeps a reservoir of ``--samples-per-step`` activation values per
layer and calibration call, and chooses ranges from them. ``diffkiln optimize`` keeps 1,024 per
sampler step over 20 steps (20,480 per layer); this benchmark calibrates on 4 calls, so it keeps
4,096 per call (16,384) to match. With 512 per call (2,048), as until 2026-12-03, the sample
misses the tails the ranges need: 23.8 / 24.7 dB against 29.8 / 30.0 dB (measured 2026-12-03).

Usage:
    python tools/bench_onnx_full.py --work /tmp/bench-onnx-full [--latent 32] [--repeat 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]

_MODEL = "sd15-unet"
_CALIB_TIMESTEPS = (999.0, 600.0, 300.0, 50.0)
_EVAL_TIMESTEPS = (800.0, 400.0)


def _calls(latent: int, timesteps: tuple[float, ...], seed: int) -> list[dict[str, Any]]:
    from diffkiln.zoo.architectures import full_denoiser_inputs

    return [full_denoiser_inputs(_MODEL, 2, latent, t, seed=seed + i) for i, t in enumerate(timesteps)]


def _export(denoiser: Any, call: dict[str, Any], path: Path, float16: bool, integer: bool = False) -> None:
    import torch

    from diffkiln.export.onnx import OnnxCompute, OnnxExportConfig, export_module_onnx

    compute = OnnxCompute.INTEGER if integer else OnnxCompute.QDQ
    with torch.no_grad():
        export_module_onnx(denoiser, call, path, OnnxExportConfig(path.parent, dynamic=False, compute=compute),
                           float16=float16)  # fmt: skip


def _build(seed: int = 0) -> Any:
    import torch

    from diffkiln.zoo.architectures import build_full_denoiser

    torch.manual_seed(seed)
    return build_full_denoiser(_MODEL).eval()


def stage_float(a: argparse.Namespace) -> dict[str, Any]:
    import copy

    import torch

    model = _build()
    call = _calls(a.latent, _CALIB_TIMESTEPS, 100)[0]
    t0 = time.perf_counter()
    _export(model, call, a.work / "fp32" / "denoiser.onnx", float16=False)
    fp32_s = time.perf_counter() - t0
    with torch.no_grad():
        refs = [model(**c, return_dict=False)[0] for c in _calls(a.latent, _EVAL_TIMESTEPS, 500)]
    torch.save(refs, a.work / "reference.pt")
    half = copy.deepcopy(model).half()
    del model
    call16 = {k: v.half() if v.is_floating_point() else v for k, v in call.items()}
    _export(half, call16, a.work / "fp16" / "denoiser.onnx", float16=False)
    return {"fp32_export_s": fp32_s}


def stage_diffkiln(a: argparse.Namespace, integer: bool = False, requantize: bool = False) -> dict[str, Any]:
    import diffkiln.api as dk

    model = _build()
    calib = _calls(a.latent, _CALIB_TIMESTEPS, 100)
    t0 = time.perf_counter()
    stats = dk.calibrate(model, dk.CalibrationConfig(samples=1, samples_per_step=a.samples_per_step), inputs=calib)
    config = dk.W8A8Config(requantize_conv_outputs=requantize)
    plan = dk.make_plan(model, stats, config, dk.SearchContext(source_id=_MODEL))
    qmodel = dk.quantize_(model, plan, stats)
    build_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    folder = "diffkiln-integer" if integer else "diffkiln-rq" if requantize else "diffkiln"
    _export(qmodel, calib[0], a.work / folder / "denoiser.onnx", float16=True, integer=integer)
    quantized = sum(1 for lp in plan.layers if lp.quantized)
    return {"build_s": build_s, "export_s": time.perf_counter() - t0, "layers": [quantized, len(plan.layers)]}


def stage_ort(a: argparse.Namespace) -> dict[str, Any]:
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from diffkiln.export.onnx.components import flatten_kwargs

    feeds = [{k: v.numpy() for k, v in flatten_kwargs(c)[0].items()} for c in _calls(a.latent, _CALIB_TIMESTEPS, 100)]

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.it = iter(feeds)

        def get_next(self) -> dict[str, Any] | None:
            return next(self.it, None)

    fp32 = a.work / "fp32" / "denoiser.onnx"
    pre = a.work / "fp32-pre" / "denoiser.onnx"
    pre.parent.mkdir(exist_ok=True)
    t0 = time.perf_counter()
    quant_pre_process(str(fp32), str(pre), skip_symbolic_shape=True, save_as_external_data=True,
                      external_data_location="denoiser.onnx.data")  # fmt: skip
    out: dict[str, Any] = {"pre_process_s": time.perf_counter() - t0}
    for name, ops in (
        ("ort-default", {}),
        ("ort-matmul-conv-rr", {"op_types_to_quantize": ["MatMul", "Conv"], "reduce_range": True}),
    ):
        path = a.work / name / "denoiser.onnx"
        path.parent.mkdir(exist_ok=True)
        t0 = time.perf_counter()
        quantize_static(str(pre), str(path), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QInt8, weight_type=QuantType.QInt8, use_external_data_format=True,
                        **ops)  # fmt: skip
        out[f"{name}_s"] = time.perf_counter() - t0
    return out


def _file_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.iterdir() if p.is_file())


def stage_time(a: argparse.Namespace) -> dict[str, Any]:
    import onnxruntime as ort
    import torch

    from diffkiln.core.metrics import sqnr_db
    from diffkiln.export.onnx.components import flatten_kwargs
    from diffkiln.runtime.onnxruntime_backend import open_session

    refs = torch.load(a.work / "reference.pt")
    evals = [{k: v.numpy() for k, v in flatten_kwargs(c)[0].items()} for c in _calls(a.latent, _EVAL_TIMESTEPS, 500)]
    out: dict[str, Any] = {}
    # diffkiln-conv-folded: the diffkiln file as diffkiln's onnxruntime backend opens it when it
    # optimizes on CPU (convolution weights dequantized once, FoldConvWeightDequantizePass).
    for name, fold in (("fp32", False), ("fp16", False), ("diffkiln", False), ("diffkiln-conv-folded", True),
                       ("diffkiln-rq", True), ("diffkiln-integer", False), ("ort-default", False),
                       ("ort-matmul-conv-rr", False)):  # fmt: skip
        folder = a.work / name.removesuffix("-conv-folded")
        entry: dict[str, Any] = {"bytes": _file_bytes(folder)}
        if name != "fp16":  # the FP16 file is sized only (CPU onnxruntime runs float16 slowly)
            options = ort.SessionOptions()
            options.log_severity_level = 3
            session = open_session(folder / "denoiser.onnx", options, ["CPUExecutionProvider"], fold)
            outs = [torch.from_numpy(session.run(None, feed)[0]) for feed in evals]
            entry["sqnr_db"] = [round(sqnr_db(r, o), 2) for r, o in zip(refs, outs, strict=True)]
            times = []
            for _ in range(a.repeat):
                t0 = time.perf_counter()
                session.run(None, evals[0])
                times.append(time.perf_counter() - t0)
            entry["ms"] = round(1000 * statistics.median(times), 1)
            del session
        out[name] = entry
        print(name, entry, flush=True)
    return out


def stage_diffkiln_integer(a: argparse.Namespace) -> dict[str, Any]:
    return stage_diffkiln(a, integer=True)


def stage_diffkiln_rq(a: argparse.Namespace) -> dict[str, Any]:
    return stage_diffkiln(a, requantize=True)


# The files the comparison is about, as (folder, fold the conv weights): diffkiln as its backend
# opens it on CPU (weights folded where the convolution is not requantized), quantize_static's as is.
_COMPARED = {"diffkiln-conv-folded": ("diffkiln", True), "diffkiln": ("diffkiln", False),
             "diffkiln-rq": ("diffkiln-rq", True), "ort-matmul-conv-rr": ("ort-matmul-conv-rr", False)}  # fmt: skip


def _eval_feed(a: argparse.Namespace) -> dict[str, Any]:
    """The first held-out call as onnxruntime feeds (the call ``time`` times)."""
    from diffkiln.export.onnx.components import flatten_kwargs

    return {k: v.numpy() for k, v in flatten_kwargs(_calls(a.latent, _EVAL_TIMESTEPS, 500)[0])[0].items()}


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 1e6


def _memory_of(a: argparse.Namespace) -> dict[str, Any]:
    """One file's session memory, in this (fresh) process."""
    import resource

    import onnxruntime as ort

    from diffkiln.runtime.onnxruntime_backend import open_session

    folder, fold = _COMPARED[a.memory_of]
    feed = _eval_feed(a)
    before = _rss_mb()
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = open_session(a.work / folder / "denoiser.onnx", options, ["CPUExecutionProvider"], fold)
    built = _rss_mb()
    session.run(None, feed)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e3  # KB on Linux
    return {"session_mb": round(built - before, 1), "after_call_mb": round(_rss_mb() - before, 1),
            "peak_mb": round(peak - before, 1)}  # fmt: skip


def stage_memory(a: argparse.Namespace) -> dict[str, Any]:
    out = {}
    for name in _COMPARED:
        cmd = [sys.executable, __file__, "--work", str(a.work), "--latent", str(a.latent), "--memory-of", name]
        subprocess.run(cmd, check=True)
        out[name] = json.loads((a.work / f"memory-{name}.json").read_text())
        print(name, out[name], flush=True)
    return out


def stage_pairs(a: argparse.Namespace) -> dict[str, Any]:
    import onnxruntime as ort

    from diffkiln.runtime.onnxruntime_backend import open_session

    feed = _eval_feed(a)
    # As diffkiln's onnxruntime backend opens its files on CPU (conv weights folded where the
    # convolution is not requantized), and quantize_static's file as it is.
    sessions = {}
    for name, (folder, fold) in _COMPARED.items():
        if name == "diffkiln":
            continue  # timed unfolded in ``time``
        options = ort.SessionOptions()
        options.log_severity_level = 3
        # An idle session's threads must not spin on the cores the next one is timed on.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        sessions[name] = open_session(a.work / folder / "denoiser.onnx", options, ["CPUExecutionProvider"], fold)
        sessions[name].run(None, feed)  # warm-up
    times: dict[str, list[float]] = {name: [] for name in sessions}
    for _ in range(a.repeat):
        for name, session in sessions.items():
            t0 = time.perf_counter()
            session.run(None, feed)
            times[name].append(time.perf_counter() - t0)
    base = times["ort-matmul-conv-rr"]
    return {
        name: {
            "ms": round(1000 * statistics.median(ts), 1),
            "ratio_to_ort_tuned": round(statistics.median(t / b for t, b in zip(ts, base, strict=True)), 3),
            "all_ms": [round(1000 * t) for t in ts],
        }
        for name, ts in times.items()
    }


STAGES = {
    "float": stage_float,
    "diffkiln": stage_diffkiln,
    "diffkiln-rq": stage_diffkiln_rq,
    "diffkiln-integer": stage_diffkiln_integer,
    "ort": stage_ort,
    "time": stage_time,
    "memory": stage_memory,
    "pairs": stage_pairs,
}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, required=True, help="scratch and results folder")
    ap.add_argument("--latent", type=int, default=32, help="latent height and width (default 32)")
    ap.add_argument("--repeat", type=int, default=3, help="timed calls per file (default 3)")
    ap.add_argument("--samples-per-step", type=int, default=4096,
                    help="diffkiln's calibration values kept per layer and call (default 4096; see above)")  # fmt: skip
    ap.add_argument("--stages", default=",".join(STAGES), help=f"comma list from {', '.join(STAGES)} (default all)")
    ap.add_argument("--stage", default=None, help=argparse.SUPPRESS)  # one stage, in a child process
    ap.add_argument("--memory-of", default=None, help=argparse.SUPPRESS)  # one file's memory, in a child
    a = ap.parse_args()
    a.work.mkdir(parents=True, exist_ok=True)
    if a.memory_of is not None:
        (a.work / f"memory-{a.memory_of}.json").write_text(json.dumps(_memory_of(a)))
        return 0
    if a.stage is not None:
        result = STAGES[a.stage](a)
        (a.work / f"stage-{a.stage}.json").write_text(json.dumps(result, indent=2))
        return 0
    stages = a.stages.split(",")
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        raise SystemExit(f"unknown stage(s) {unknown}; valid: {', '.join(STAGES)}")
    results: dict[str, Any] = {"model": _MODEL, "latent": a.latent, "batch": 2}
    for stage in stages:
        t0 = time.perf_counter()
        cmd = [sys.executable, __file__, "--work", str(a.work), "--latent", str(a.latent), "--repeat", str(a.repeat),
               "--samples-per-step", str(a.samples_per_step), "--stage", stage]  # fmt: skip
        subprocess.run(cmd, check=True)
        results[stage] = json.loads((a.work / f"stage-{stage}.json").read_text())
        results[stage]["wall_s"] = round(time.perf_counter() - t0, 1)
        print(f"{stage}: {results[stage]}", flush=True)
    (a.work / "results.json").write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
