"""The onnxruntime pipeline against the torch bundle, and the bundle's own sensitivity floor.

For each prompt (seed = its index), 20 sampler steps:

* **ORT vs torch**: final latents of ``runtime.load(ONNX_DIR, backend="onnxruntime")`` against the
  torch bundle (latent SQNR), and, for the first and last prompt, every denoiser call fed the
  torch run's recorded inputs (teacher-forced, per-call SQNR; 129 dB and up means the calls
  differ only by float rounding, no activation code flipped);
* **one-ulp floor**: the torch bundle against itself with every element of the initial noise moved
  one ulp up (``torch.nextafter``), and the same for the FP model the bundle came from. A quantized
  sampler's trajectory is discontinuous in its input (a rounding boundary flips a code, the
  sampler amplifies it), so no second implementation that is not bit-identical can match the
  bundle more closely than this floor;
* **the torch bundle on another CPU**: on a CPU with an int8 dot-product unit (VNNI/AMX), the same
  bundle loaded as a CPU without one (AVX2) runs it, 8-bit layers on the exact integer fallback
  instead of oneDNN's kernels, against the bundle as loaded here: how far the reference itself
  moves between two machines (null on a CPU without VNNI, where both are the same path).

Usage:
    python tools/bench_ort_parity.py --bundle B --onnx DIR [--prompts 4] [--out tools/results/ort_parity.json]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]

PROMPTS = (
    "a red circle on the left",
    "a blue square at the top",
    "a green triangle on the right",
    "a yellow circle left of a red square",
    "a green square at the bottom",
    "a blue triangle on the left",
)
BIT_IDENTICAL_DB = 200.0  # reported for calls whose outputs are equal


def _run(pipe: Any, prompt: str, seed: int, latents: Any = None, record: bool = False) -> tuple[Any, list[Any]]:
    import torch

    from diffkiln.core.hooks import recording_calls

    denoiser = getattr(pipe, pipe.diffkiln_manifest["pipeline"]["denoiser"])
    kwargs: dict[str, Any] = {"num_inference_steps": 20, "guidance_scale": 5.0, "output_type": "latent"}
    kwargs.update({"latents": latents} if latents is not None else {"generator": torch.Generator().manual_seed(seed)})
    with recording_calls("bench.parity", denoiser) as calls, torch.no_grad():
        out = pipe(prompt, **kwargs).images
    return out, (calls if record else [])


def _initial_noise(pipe: Any, seed: int) -> Any:
    import torch

    den = pipe.unet
    shape = (1, den.config.in_channels, den.config.sample_size, den.config.sample_size)
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * pipe.scheduler.init_noise_sigma


def _ulp_floor(pipe: Any, prompts: list[str]) -> list[float]:
    import torch

    from diffkiln.core.metrics import sqnr_db

    pipe.set_progress_bar_config(disable=True)
    out = []
    for i, p in enumerate(prompts):
        z = _initial_noise(pipe, i)
        a, _ = _run(pipe, p, i, latents=z.clone())
        b, _ = _run(pipe, p, i, latents=torch.nextafter(z, torch.full_like(z, float("inf"))))
        out.append(round(sqnr_db(a, b), 2))
    return out


def _other_cpu_path(bundle: Path, prompts: list[str], reference: list[Any]) -> list[float] | None:
    """Per-prompt SQNR of the bundle run as an AVX2 CPU runs it against ``reference`` (this CPU's)."""
    from unittest import mock

    import torch

    from diffkiln.core.metrics import sqnr_db
    from diffkiln.kernels import backends
    from diffkiln.runtime import load

    if not backends.cpu_has_vnni():
        return None
    out = []
    with mock.patch.object(backends, "cpu_has_vnni", lambda: False):  # scoped to this comparison
        pipe = load(bundle, device="cpu")
        pipe.set_progress_bar_config(disable=True)
        for i, (prompt, ref) in enumerate(zip(prompts, reference, strict=True)):
            got, _ = _run(pipe, prompt, i)
            out.append(BIT_IDENTICAL_DB if torch.equal(ref, got) else round(sqnr_db(ref, got), 2))
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", type=Path, required=True, help="a diffkiln bundle (a UNet pipeline)")
    parser.add_argument("--onnx", type=Path, required=True, help="its `diffkiln export --format onnx` folder")
    parser.add_argument("--prompts", type=int, default=4, help=f"prompts, at most {len(PROMPTS)} (default 4)")
    parser.add_argument("--out", type=Path, default=None, help="also write the figures as JSON here")
    args = parser.parse_args()

    import torch

    from diffkiln.core.metrics import sqnr_db
    from diffkiln.generation import load_pipeline
    from diffkiln.runtime import load

    prompts = list(PROMPTS[: args.prompts])
    torch_pipe, ort_pipe = load(args.bundle, device="cpu"), load(args.onnx, backend="onnxruntime")
    for p in (torch_pipe, ort_pipe):
        p.set_progress_bar_config(disable=True)
    latents_t, latents_o, per_call = [], [], {}
    for i, prompt in enumerate(prompts):
        lt, calls = _run(torch_pipe, prompt, i, record=i in (0, len(prompts) - 1))
        lo, _ = _run(ort_pipe, prompt, i)
        latents_t.append(lt)
        latents_o.append(lo)
        if calls:
            figures = []
            for call_args, call_kwargs in calls:
                with torch.no_grad():
                    a = torch_pipe.unet(*call_args, **call_kwargs)[0]
                    b = ort_pipe.unet(*call_args, **call_kwargs)[0]
                figures.append(BIT_IDENTICAL_DB if torch.equal(a, b) else round(sqnr_db(a, b), 1))
            per_call[prompt] = figures
    source = torch_pipe.diffkiln_manifest["source"]["id"]
    results = {
        "bundle": str(args.bundle),
        "onnx": str(args.onnx),
        "prompts": prompts,
        "ort_vs_torch_latent_sqnr_db": [round(sqnr_db(a, b), 2) for a, b in zip(latents_t, latents_o, strict=True)],
        "ort_vs_torch_pooled_db": round(sqnr_db(torch.cat(latents_t), torch.cat(latents_o)), 2),
        "ort_vs_torch_per_call_db": per_call,
        "bundle_one_ulp_floor_db": _ulp_floor(torch_pipe, prompts),
        "bundle_avx2_path_vs_this_cpu_db": _other_cpu_path(args.bundle, prompts, latents_t),
        "fp_one_ulp_floor_db": _ulp_floor(load_pipeline(source), prompts),
    }
    print(json.dumps(results, indent=2))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
