"""Fuzz bundles and an ONNX export: thousands of mutations, each loaded and run in a child process
so that a crash (a signal) or a hang (past ``--case-timeout``) is counted, not fatal.

Bundles: W8A8, mixed 4-bit and W8A8 with requantized convolution outputs, built with ``optimize``
from a tiny random SD1.5-architecture pipeline, and the W8A8 bundle's ONNX export (loaded with the
onnxruntime backend). Mutations: :func:`diffkiln.testing.bundle_fuzz.mutate` (manifest values,
tensors, files; most re-signed). Outcomes: :data:`diffkiln.testing.bundle_fuzz.OUTCOMES`, plus
``crash`` and ``hang``; the targets are zero of ``escape``, ``first_use``, ``crash`` and ``hang``.
Counts go to ``tools/results/fuzz_bundles.json``, with every failing case's seed and description.

Usage: python tools/fuzz_bundles.py [--cases 10000] [--seed 0] [--case-timeout 120]
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

RESULTS = Path(__file__).resolve().parent / "results"
KINDS = ("w8a8", "mixed4", "requant", "onnx")


def _run(pipe: Any) -> torch.Tensor:
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        out = pipe("a red circle on the left", num_inference_steps=1, generator=torch.Generator().manual_seed(0),
                   output_type="latent", height=64, width=64)  # fmt: skip
    return out.images


def _loader(kind: str) -> Any:
    from diffkiln.runtime import load

    if kind == "onnx":
        return lambda p: load(p, backend="onnxruntime")
    return lambda p: load(p, device="cpu")


def build(root: Path) -> dict[str, Path]:
    """The fuzzed artifacts, built once under ``root``."""
    from diffkiln.api import MixedConfig, OptimizeConfig, W8A8Config, convert, optimize
    from diffkiln.export.onnx import OnnxExportConfig
    from diffkiln.zoo.architectures import save_tiny_pipeline

    folder = save_tiny_pipeline("tiny-sd15", root / "tiny-sd15")
    kw = (("height", 64), ("width", 64))
    recipes = {"w8a8": W8A8Config(), "mixed4": MixedConfig(avg_weight_bits=4.0),
               "requant": W8A8Config(requantize_conv_outputs=True)}  # fmt: skip
    out = {}
    for kind, recipe in recipes.items():
        config = OptimizeConfig(out=root / kind, recipe=recipe, calib_size=2, steps=2, call_kwargs=kw,
                                progress=False, cache_dir=root / "c")  # fmt: skip
        out[kind] = optimize(str(folder), config)
    out["onnx"] = convert(out["w8a8"], OnnxExportConfig(root / "onnx", progress=False))
    return out


def worker(artifacts: dict[str, str]) -> None:
    """Read ``kind seed`` lines on stdin; answer one JSON line per case on the original stdout,
    while anything a library prints goes to stderr (it would break the protocol)."""
    import os

    from diffkiln.testing.bundle_fuzz import classify, mutate

    answers = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    refs = {k: _run(_loader(k)(Path(p))) for k, p in artifacts.items()}
    print(json.dumps({"ready": True}), file=answers, flush=True)
    for line in sys.stdin:
        kind, seed = line.split()
        with tempfile.TemporaryDirectory() as tmp:
            case = mutate(Path(artifacts[kind]), Path(tmp) / "b", random.Random(int(seed)))
            outcome, detail = classify(Path(tmp) / "b", _loader(kind), _run, refs[kind])
        print(json.dumps({"outcome": outcome, "detail": detail, "case": case.description,
                          "resigned": case.resigned}), file=answers, flush=True)  # fmt: skip


class _Worker:
    def __init__(self, artifacts: dict[str, Path]) -> None:
        arg = json.dumps({k: str(v) for k, v in artifacts.items()})
        self.proc = subprocess.Popen([sys.executable, __file__, "--worker", arg], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, bufsize=1)  # fmt: skip
        assert self.proc.stdout is not None
        self.proc.stdout.readline()  # ready

    def ask(self, kind: str, seed: int, timeout: float) -> dict[str, Any]:
        import select

        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(f"{kind} {seed}\n")
        self.proc.stdin.flush()
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not ready:
            self.proc.kill()
            return {"outcome": "hang"}
        line = self.proc.stdout.readline()
        if not line:
            return {"outcome": "crash", "detail": f"exit status {self.proc.wait()}"}
        result: dict[str, Any] = json.loads(line)
        return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", type=int, default=10000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--case-timeout", type=float, default=120.0)
    ap.add_argument("--resume", action="store_true",
                    help="continue the run recorded in tools/results/fuzz_bundles.json from its last case")  # fmt: skip
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        worker(json.loads(a.worker))
        return
    root = Path(tempfile.mkdtemp(prefix="fuzz-"))
    artifacts = build(root)
    counts: dict[str, dict[str, int]] = {k: {} for k in KINDS}
    failures: list[dict[str, Any]] = []
    start, earlier = 0, 0.0
    if a.resume and (RESULTS / "fuzz_bundles.json").is_file():
        done = json.loads((RESULTS / "fuzz_bundles.json").read_text())
        start, earlier = int(done["cases"]), float(done["seconds"])
        counts, failures = done["counts"], done["failures"]
    w = _Worker(artifacts)
    t0 = time.time() - earlier
    for i in range(start, a.cases):
        kind, seed = KINDS[i % len(KINDS)], a.seed + i
        r = w.ask(kind, seed, a.case_timeout)
        counts[kind][r["outcome"]] = counts[kind].get(r["outcome"], 0) + 1
        if r["outcome"] in ("escape", "first_use", "crash", "hang"):
            failures.append({"kind": kind, "seed": seed, **r})
        if r["outcome"] in ("crash", "hang"):
            w = _Worker(artifacts)
        if (i + 1) % 100 == 0 or i + 1 == a.cases:
            record = {"cases": i + 1, "seconds": round(time.time() - t0), "counts": counts, "failures": failures}
            RESULTS.mkdir(exist_ok=True)
            (RESULTS / "fuzz_bundles.json").write_text(json.dumps(record, indent=2) + "\n")
            print(f"{i + 1} cases, {len(failures)} failures, {round(time.time() - t0)} s: {counts}", flush=True)


if __name__ == "__main__":
    main()
