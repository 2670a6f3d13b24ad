"""The scale model of docs/scaling.md: communication bytes, compute and expected speed-up of CFG
parallel and Ulysses context parallel on full-size SD3 / FLUX / Wan2.1 geometries, on 2, 4 and 8
devices for a given link bandwidth. Pure arithmetic (no model is built); every input is printed.

Model, per denoiser call (one CFG branch, batch 1, bf16):
* compute: 2 FLOPs per multiply-add of every linear layer of the blocks (attention projections,
  cross-attention, MLP) plus self-attention's QK^T and PV (4 * S^2 * width per layer), at an
  achieved ``--tflops`` (the H200's measured bf16 matmul rate times ``--efficiency``).
* Ulysses (degree U): four all-to-alls per self-attention layer (Q, K, V before, O after); each
  rank sends (U-1)/U of its S/U x width slice of each: 4 * (S/U) * width * 2 bytes * (U-1)/U.
* CFG parallel (degree 2): one all-gather of the denoiser output per step (latent size x 2 bytes).
* time(P) = compute / P + bytes / bandwidth + a fixed latency per collective; no overlap of
  communication and compute is assumed (a pessimistic bound).

Usage: python tools/scaling_model.py [--tflops 790] [--efficiency 0.5] [--markdown]
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass

# Link bandwidths per direction per device, GB/s: NVLink 4 is 900 GB/s both ways per H100/H200
# SXM (NVIDIA's datasheet); PCIe 4.0 x16 is 31.5 GB/s raw per direction (PCI-SIG), ~25 achieved;
# the HCCS figure is an assumed input (not checked against a primary source here): pass your own.
LINKS = {"NVLink 4 (H100/H200)": 450.0, "HCCS (assumed 196)": 196.0, "PCIe 4.0 x16": 25.0}
LATENCY_S = 20e-6  # per collective call


@dataclass(frozen=True)
class Geometry:
    """A full-size denoiser at one resolution: blocks, width, MLP width, tokens."""

    name: str
    layers: int
    width: int
    mlp: int
    tokens: int  # self-attention sequence (image/video + joint text where the model attends jointly)
    text: int  # cross-attention keys (0: joint attention, text already in ``tokens``)
    latent_elems: int  # the denoiser output's elements (CFG gather)
    cfg: bool = True  # two denoiser calls per step (FLUX.1-dev is guidance-distilled: one)


GEOMETRIES = (
    # SD3-medium 1024^2: 24 joint blocks, width 1536, 4096 image + 333 text tokens
    Geometry("SD3-medium 1024x1024", 24, 1536, 6144, 4096 + 333, 0, 16 * 128 * 128),
    # FLUX.1-dev 1024^2: 19 double + 38 single blocks, width 3072, 4096 image + 512 text tokens
    Geometry("FLUX.1-dev 1024x1024", 57, 3072, 12288, 4096 + 512, 0, 16 * 128 * 128, cfg=False),
    # Wan2.1-1.3B 480p 81 frames: 30 blocks, width 1536, MLP 8960, 32,760 video tokens, 512 text
    Geometry("Wan2.1-1.3B 480p 81f", 30, 1536, 8960, 32760, 512, 16 * 21 * 60 * 104),
    # Wan2.1-14B 480p 81 frames: 40 blocks, width 5120, MLP 13824
    Geometry("Wan2.1-14B 480p 81f", 40, 5120, 13824, 32760, 512, 16 * 21 * 60 * 104),
)


def flops(g: Geometry) -> float:
    """FLOPs of one call (batch 1)."""
    s, w = g.tokens, g.width
    per_layer = 2 * s * w * w * 4 + 2 * s * w * g.mlp * 2 + 4 * s * s * w  # qkvo, MLP in/out, QK^T + PV
    if g.text:
        per_layer += 2 * s * w * w * 2 + 2 * g.text * w * w * 2 + 4 * s * g.text * w  # cross q/o, k/v, attention
    return float(per_layer * g.layers)


def ulysses_bytes(g: Geometry, u: int) -> float:
    """Bytes one rank sends per call with Ulysses degree ``u`` (bf16)."""
    return 0.0 if u == 1 else 4 * (g.tokens / u) * g.width * 2 * (u - 1) / u * g.layers


def step_time(g: Geometry, devices: int, link_gbs: float, tflops: float) -> tuple[float, float, float]:
    """(one device, ``devices`` devices, bytes per rank) for one sampling step: with CFG (two calls)
    CFG parallel 2 x Ulysses devices/2; without, Ulysses over all devices."""
    cfg = 2 if devices >= 2 and g.cfg else 1
    compute = (2 if g.cfg else 1) * flops(g) / (tflops * 1e12)
    u = devices // cfg
    nbytes = ulysses_bytes(g, u) + (g.latent_elems * 2 * (cfg - 1) / cfg)
    calls = 4 * g.layers * (u > 1) + (cfg > 1)
    parallel = compute / devices + nbytes / (link_gbs * 1e9) + calls * LATENCY_S
    return compute, parallel, nbytes


def table(tflops: float) -> list[dict[str, object]]:
    """Every geometry x link x device count."""
    rows = []
    for g in GEOMETRIES:
        for link, bw in LINKS.items():
            for n in (2, 4, 8):
                one, many, nbytes = step_time(g, n, bw, tflops)
                rows.append({"model": g.name, "link": link, "devices": n, "tflops_per_call": round(flops(g) / 1e12, 2),
                             "step_1_device_s": round(one, 4), "step_s": round(many, 4),
                             "bytes_per_rank_MB": round(nbytes / 1e6, 1), "speedup": round(one / many, 2)})  # fmt: skip
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tflops", type=float, default=790.0, help="peak bf16 matmul TFLOP/s measured on the device")
    ap.add_argument("--efficiency", type=float, default=0.5, help="achieved fraction of --tflops over a call")
    ap.add_argument("--link", nargs=2, action="append", metavar=("NAME", "GBS"),
                    help="another link: its name and GB/s per direction (repeatable)")  # fmt: skip
    ap.add_argument("--markdown", action="store_true")
    a = ap.parse_args()
    for name, gbs in a.link or []:
        LINKS[name] = float(gbs)
    rows = table(a.tflops * a.efficiency)
    if not a.markdown:
        print(json.dumps(rows, indent=2))
        return
    cols = ["model", "link", "devices", "TFLOP per call", "step, 1 device (s)", "step (s)",
            "sent per rank per step (MB)", "speed-up"]  # fmt: skip
    print("| " + " | ".join(cols) + " |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['link']} | {r['devices']} | {r['tflops_per_call']} | {r['step_1_device_s']} | "
              f"{r['step_s']} | {r['bytes_per_rank_MB']} | {r['speedup']}x |")  # fmt: skip


if __name__ == "__main__":
    main()
