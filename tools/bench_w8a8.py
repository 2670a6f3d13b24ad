"""Denoiser speed and memory, side by side: FP32 eager, BF16 eager, diffkiln W8A8, torchao int8.

Each variant runs in its own fresh process (so one variant's memory never counts against
another's) on a full-size denoiser with random weights from ``diffkiln.zoo.architectures``:

* ``fp32``    the float model, eager;
* ``bf16``    the model cast to bfloat16, eager (capped by ``--bf16-timeout``: CPUs without
              AVX512-BF16/AMX emulate it, measured 220x slower than fp32 on a 320-channel conv);
* ``w8a8``    diffkiln's integer runtime modules (QLinear/QConv2d), built from a plan calibrated
              on the model itself (random inputs at spread timesteps), same code as a bundle;
* ``w8a8-bf16`` the same, with everything outside the integer layers (attention, norms, layers
              kept in FP) in bfloat16 (``load(..., dtype="bfloat16")``; fast where bf16 is);
* ``torchao`` torchao's ``Int8DynamicActivationInt8WeightConfig`` (a peer), eager, no compile;
* ``quanto``  optimum-quanto W8A8 (a peer): qint8 weights, qint8 activations calibrated on the
              same calls as ``w8a8``, frozen, eager.

Each variant also reports its output's SQNR against the float32 model on the timed call.

Reported per variant: median ms per denoiser call (one sampler step at the given batch, which
includes CFG's doubled batch when --batch 2), and the peak resident memory during the calls
(process RSS, sampled every 2 ms) next to the weight bytes.

Usage:
    python tools/bench_w8a8.py --model sd15-unet --batch 2 --latent 64 --repeat 3
    python tools/bench_w8a8.py --model pixart-alpha --batch 2 --latent 64 --variants fp32,w8a8,torchao
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from typing import Any

VARIANTS = ("fp32", "bf16", "w8a8", "w8a8-bf16", "torchao", "quanto")


def _inputs(model: str, batch: int, latent: int, timestep: float, seed: int) -> dict[str, Any]:
    from diffkiln.zoo.architectures import full_denoiser_inputs

    return full_denoiser_inputs(model, batch, latent, timestep, seed)


class _RssPeak:
    """Peak resident set size of this process while active, sampled from /proc every 2 ms."""

    def __init__(self) -> None:
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def rss() -> int:
        with open("/proc/self/statm", encoding="ascii") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.rss())
            time.sleep(0.002)

    def __enter__(self) -> _RssPeak:
        self.peak = self.rss()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def _build_w8a8(model: Any, name: str, a: argparse.Namespace) -> Any:
    """Calibrate, plan and quantize in memory with diffkiln's public API (the modules a bundle loads)."""
    import diffkiln.api as dk
    from diffkiln.optimizer import SmoothMode

    # Calibration at a small batch over spread timesteps (the plan needs ranges, not accuracy).
    calls = [_inputs(name, 1, a.latent, t, seed=100 + i) for i, t in enumerate((999.0, 600.0, 300.0, 50.0))]
    stats = dk.calibrate(model, dk.CalibrationConfig(samples=1, samples_per_step=512), inputs=calls)
    config = dk.W8A8Config(weight_bits=a.weight_bits, act_bits=a.act_bits, smooth=SmoothMode(a.smooth))
    plan = dk.make_plan(model, stats, config, dk.SearchContext(source_id=name))
    return dk.quantize_(model, plan, stats)


def _return_freed_memory() -> None:
    """Hand freed heap pages back to the OS (glibc), so RSS during the calls counts what is live.

    The W8A8 and torchao variants are built from the FP32 model in the same process; without
    this their peak RSS would include the freed FP32 weights, which a bundle loaded by the
    runtime never holds.
    """
    import contextlib
    import ctypes

    with contextlib.suppress(OSError, AttributeError):  # not glibc: RSS may include freed pages
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _weight_bytes(model: Any) -> int:
    """Resident bytes of the model after its calls (``diffkiln.runtime.memory.resident_bytes``, which
    counts oneDNN's prepacked weights too), or the plain tensor sum where that cannot read a tensor
    (torchao's and quanto's tensor subclasses)."""
    from diffkiln.runtime.memory import resident_bytes

    try:
        return resident_bytes(model)
    except (NotImplementedError, RuntimeError, TypeError):
        return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])


def worker(a: argparse.Namespace) -> dict[str, Any]:
    """Build one variant, time it, and return its figures (runs in a fresh process)."""
    import gc

    import torch

    from diffkiln.core.metrics import sqnr_db
    from diffkiln.zoo.architectures import build_full_denoiser

    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    model = build_full_denoiser(a.model)
    dtype = torch.float32
    kw = _inputs(a.model, a.batch, a.latent, 500.0, seed=1)
    with torch.no_grad():
        reference = model(**kw, return_dict=False)[0]
    if a.variant == "bf16":
        model = model.to(torch.bfloat16)
        dtype = torch.bfloat16
    elif a.variant in ("w8a8", "w8a8-bf16"):
        with torch.no_grad():
            model = _build_w8a8(model, a.model, a)
        if a.variant == "w8a8-bf16":
            from diffkiln.runtime.dtype import cast_float_parts

            cast_float_parts(model, torch.bfloat16)
            dtype = torch.bfloat16
    elif a.variant == "torchao":
        from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_

        quantize_(model, Int8DynamicActivationInt8WeightConfig())
    elif a.variant == "quanto":
        from optimum.quanto import Calibration, freeze, qint8, quantize

        quantize(model, weights=qint8, activations=qint8)
        calls = [_inputs(a.model, 1, a.latent, t, seed=100 + i) for i, t in enumerate((999.0, 600.0, 300.0, 50.0))]
        with Calibration(), torch.no_grad():
            for call in calls:
                model(**call)
        freeze(model)
    gc.collect()
    _return_freed_memory()
    build_s = time.perf_counter() - t0
    kw = {k: (v.to(dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else v) for k, v in kw.items()}
    times = []
    with torch.no_grad(), _RssPeak() as mem:
        for _ in range(a.warmup + a.repeat):
            t = time.perf_counter()
            out = model(**kw, return_dict=False)[0]
            times.append(time.perf_counter() - t)
    times = sorted(times[a.warmup :])
    return {
        "variant": a.variant,
        "ms_per_step": round(1000 * times[len(times) // 2], 1),
        "ms_all": [round(1000 * x, 1) for x in times],
        "peak_rss_bytes": mem.peak,
        "weight_bytes": _weight_bytes(model),
        "build_seconds": round(build_s, 1),
        "output_sqnr_vs_fp32_db": round(sqnr_db(reference.float().numpy(), out.float().numpy()), 1),
    }


def _run_variant(a: argparse.Namespace, variant: str) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--worker", "--variant", variant, *_shared_args(a)]
    timeout = a.bf16_timeout if variant == "bf16" else a.timeout
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return {"variant": variant, "ms_per_step": None, "note": f"did not finish one call within {timeout} s"}
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("{")]
    if out.returncode != 0 or not lines:
        return {"variant": variant, "ms_per_step": None, "note": f"failed: {out.stderr.strip()[-300:]}"}
    return json.loads(lines[-1])


def _shared_args(a: argparse.Namespace) -> list[str]:
    return [
        "--model", a.model, "--batch", str(a.batch), "--latent", str(a.latent), "--repeat", str(a.repeat),
        "--warmup", str(a.warmup), "--threads", str(a.threads), "--weight-bits", str(a.weight_bits),
        "--act-bits", str(a.act_bits), "--smooth", a.smooth,
    ]  # fmt: skip


def _table(a: argparse.Namespace, rows: list[dict[str, Any]]) -> str:
    import torch

    from diffkiln.kernels.backends import cpu_has_vnni

    base = next((r["ms_per_step"] for r in rows if r["variant"] == "fp32" and r["ms_per_step"]), None)
    head = (
        f"{a.model}, batch {a.batch}, {a.latent}x{a.latent} latents, torch {torch.__version__}, "
        f"{a.threads} threads, VNNI/AMX: {cpu_has_vnni()}, W8A8 grid: w{a.weight_bits}a{a.act_bits}, "
        f"smooth {a.smooth}\n"
    )
    lines = [
        head,
        "| variant | ms/step (median) | vs fp32 | output SQNR vs fp32 | peak RSS during calls | weights |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        ms = r.get("ms_per_step")
        if ms is None:
            lines.append(f"| {r['variant']} | {r.get('note', 'n/a')} | | | | |")
            continue
        rel = f"{ms / base:.2f}x" if base else ""
        lines.append(
            f"| {r['variant']} | {ms:.0f} | {rel} | {r.get('output_sqnr_vs_fp32_db', '')} dB | "
            f"{r['peak_rss_bytes'] / 2**30:.2f} GiB | "
            f"{r['weight_bytes'] / 2**30:.2f} GiB |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="sd15-unet", help="a full-size denoiser (default sd15-unet)")
    ap.add_argument("--batch", type=int, default=2, help="batch per call; 2 = one prompt with CFG (default 2)")
    ap.add_argument("--latent", type=int, default=64, help="latent side (64 = 512px for SD1.5) (default 64)")
    ap.add_argument("--repeat", type=int, default=3, help="timed calls per variant (default 3)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed calls first (default 1)")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads (default: all)")
    ap.add_argument("--variants", default=",".join(VARIANTS), help=f"comma list from {', '.join(VARIANTS)}")
    ap.add_argument("--weight-bits", type=int, choices=[7, 8], default=8, help="W8A8 weight grid (default 8)")
    ap.add_argument("--act-bits", type=int, choices=[7, 8], default=7, help="W8A8 activation grid (default 7)")
    ap.add_argument("--smooth", choices=["auto", "all", "off"], default="auto", help="W8A8 smoothing (default auto)")
    ap.add_argument("--bf16-timeout", type=float, default=600.0, help="seconds before giving up on bf16")
    ap.add_argument("--timeout", type=float, default=1800.0, help="seconds before giving up on another variant")
    ap.add_argument("--json", help="also write the rows to this JSON file")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--variant", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        print(json.dumps(worker(a)), flush=True)
        return
    variants = [v for v in a.variants.split(",") if v]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variant(s) {unknown}; valid: {', '.join(VARIANTS)}")
    rows = []
    for v in variants:
        print(f"running {v} ...", file=sys.stderr, flush=True)
        rows.append(_run_variant(a, v))
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    print(_table(a, rows))
    if a.json:
        with open(a.json, "w", encoding="utf-8") as f:
            json.dump({"args": vars(a), "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
