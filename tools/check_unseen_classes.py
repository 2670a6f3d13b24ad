"""Twenty-one denoiser classes built outside the test matrix, and Wan 2.2's two-expert sampler, each
with shapes and call arguments of its own, run through `diffkiln optimize FOLDER` with
`--call-arg` options only, as a user would. The builders are in tools/unseen_image_classes.py and
tools/unseen_video_classes.py.

For each: build the tiny pipeline (random weights, seed 1) and save it as a diffusers folder; run
the CLI in a fresh process; then load the bundle and the folder and compare the bundle's denoiser
with the FP one on every sampler call of a held-out prompt (per-call SQNR; issue 20's bar: 20 dB),
each of a call's predictions apart (LTX-2's video and audio), and each quantized expert beside it
on its own calls.
Then `diffkiln report BUNDLE` in a fresh process, which decodes: the final latents' SQNR against
FP (the frames' PSNR where the pipeline gives no step callback). Allegro's VAE decodes only in
tiles: its report runs with `--vae-tiling`, and once without, to record the one-line error that
names the option; HunyuanVideo 1.5's decodes one clip per call: `--batch-size 1`, and once with
two. Last, `diffkiln export BUNDLE --format onnx --denoiser-only`: the graph's dynamic axes and
its check against the torch runtime, or the error.
Eighteen of the twenty-one classes are in no test matrix entry (Allegro, Mochi, AnimateDiff,
PixArt-Sigma, HunyuanVideo, HunyuanVideo 1.5, Kandinsky 5, SANA-Video, Helios, CogView4, SANA,
Chroma, FLUX.2 [klein], SkyReels-V2 diffusion forcing; Lumina2 and QwenImage only in
tests/matrix/test_constructor_tensors.py, Z-Image only in tests/matrix/test_list_inputs.py,
HiDream only in tests/matrix/test_stacked_sequences.py, at other widths); LTX-2 is the builder of
tests/matrix/test_joint_latents.py (``diffkiln.zoo.architectures.audio_video``); the other two
(HunyuanDiT, Stable Audio) are built at other widths and depths. ``wan22``
is Wan2.2-T2V-A14B's layout: two transformers of one config, initialised independently, the second
below 0.875 of the timesteps (tests/matrix/test_expert_split.py has a perturbed copy at 0.6);
``wan22-i2v`` is Wan2.2-I2V-A14B's, with an input image and the boundary at 0.9. The
decoder language models' tokenizers (Llama, GLM, Gemma 2 and 3, Qwen2.5-VL, Qwen3) are diffkiln's
word-level stand-in (`lm_tokenizer`).
``--only`` runs some classes; ``--out`` keeps the other classes' rows of an earlier run.

Usage:
    python tools/check_unseen_classes.py --work /tmp/unseen --out tools/results/unseen_classes.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
from unseen_image_classes import IMAGE_CLASSES
from unseen_video_classes import ONE_CLIP_PER_DECODE, TILED_VAE, VIDEO_CLASSES

from diffkiln.calibrate import batch_kwargs, source_for
from diffkiln.core.hooks import recording_calls
from diffkiln.core.metrics import sqnr_db
from diffkiln.generation import load_pipeline

MIN_CALL_SQNR_DB = 20.0
CLASSES = {**IMAGE_CLASSES, **VIDEO_CLASSES}


def _flat(out: Any) -> torch.Tensor:
    """A denoiser's output as one tensor (Z-Image returns a list, one tensor per sample)."""
    return torch.cat([t.flatten() for t in out]) if isinstance(out, (list, tuple)) else out


def _per_call(fp: Any, q: Any, call_kwargs: dict[str, Any], name: str) -> list[list[float]]:
    """Per-call SQNR of the bundle's quantized component ``name`` (of ``q``) against the FP one: a
    list per output of the call (one, or one per latent a model denoises jointly, as LTX-2's video
    and audio), a value per call."""
    fp_den, q_den = getattr(fp, name), getattr(q, name)
    source = source_for(fp, ["a green tree beside a small house"], 1)
    fp.set_progress_bar_config(disable=True)
    with recording_calls("check.record", fp_den) as calls, torch.no_grad():
        fp(
            **batch_kwargs(fp, [source.sample(0)], own_media=True),  # one image as it is (Wan image-to-video)
            **call_kwargs,
            num_inference_steps=3,
            output_type="latent",
            generator=torch.Generator().manual_seed(7),
        )
    out: list[list[float]] = []
    for args, kwargs in calls:
        kwargs = {**kwargs, "return_dict": False}
        with torch.no_grad():
            ref, got = (den(*args, **kwargs) for den in (fp_den, q_den))
        pairs = [(r, g) for r, g in zip(ref, got, strict=True) if isinstance(r, (torch.Tensor, list))]
        out.extend([] for _ in range(len(pairs) - len(out)))
        for values, (r, g) in zip(out, pairs, strict=False):
            values.append(round(float(sqnr_db(_flat(r), _flat(g))), 1))
    return out


def _report(bundle: Path, out: Path, tiled: bool, one_per_call: bool = False) -> dict[str, Any]:
    """``diffkiln report`` on ``bundle`` in a fresh process: its latent SQNR, or its error line."""
    cmd = [sys.executable, "-m", "diffkiln.cli", "report", str(bundle), "--eval-size", "2", "--steps", "4",
           "--out", str(out), "--no-progress", *(["--vae-tiling"] if tiled else []),
           *(["--batch-size", "1"] if one_per_call else [])]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
        return {"rc": proc.returncode, "error": errors or proc.stderr.strip().splitlines()[-3:]}
    fidelity = json.loads((out / "report.json").read_text())["fidelity"]
    # No final latents where the pipeline takes no step callback (HunyuanVideo 1.5): its frames' PSNR.
    latent = fidelity["latent_sqnr_db"]
    return {"rc": 0, "latent_sqnr_db": None if latent is None else round(latent, 1),
            **({"frames_psnr_db": round(fidelity["image_psnr_db"], 1)} if latent is None else {})}  # fmt: skip


def _onnx(bundle: Path, out: Path) -> dict[str, Any]:
    """``diffkiln export BUNDLE --format onnx --denoiser-only`` in a fresh process: the denoiser
    graph's axes and its check against the torch runtime, or the one-line error."""
    cmd = [sys.executable, "-m", "diffkiln.cli", "export", str(bundle), "--format", "onnx", "--denoiser-only",
           "--out", str(out), "--overwrite", "--no-progress"]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
        return {"rc": proc.returncode, "error": errors or proc.stderr.strip().splitlines()[-3:]}
    manifest = json.loads((out / "manifest.json").read_text())
    entry = manifest["components"][manifest["pipeline"]["denoiser"]]
    experts = manifest["pipeline"].get("experts", [])
    return {
        "rc": 0,
        "dynamic_axes": entry["dynamic_axes"] if entry["dynamic"] else None,
        "static_reason": entry.get("static_reason", "")[:200] or None,
        "check_sqnr_db": entry["check"]["sqnr_db"],
        # Several predictions (LTX-2's video and audio), and a graph per further form of the calls.
        **({"outputs": [f for f, _ in entry["output_fields"]]} if len(entry["output_fields"]) > 1 else {}),
        **({"variants": [{"options": {k: v for k, v in variant["options"].items() if entry["options"].get(k) != v},
                          "check_sqnr_db": variant["check"]["sqnr_db"]} for variant in entry["variants"]]}
           if entry.get("variants") else {}),
        **(
            {"expert_check_sqnr_db": {e: manifest["components"][e]["check"]["sqnr_db"] for e in experts}}
            if experts
            else {}
        ),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, required=True, help="folder for the pipelines and bundles")
    ap.add_argument("--only", help="comma-separated class names (default: all)")
    ap.add_argument("--out", type=Path, help="write the rows as JSON here")
    a = ap.parse_args()
    rows = []
    for name in a.only.split(",") if a.only else CLASSES:
        build, call_kwargs = CLASSES[name]
        folder, bundle = a.work / name, a.work / f"{name}-w8a8"
        if not (folder / "model_index.json").is_file():
            torch.manual_seed(1)
            build(a.work / f"{name}-scratch").save_pretrained(folder)
        args = [arg for k, v in call_kwargs.items() for arg in ("--call-arg", f"{k}={json.dumps(v)}")]
        cmd = [
            sys.executable,
            "-m",
            "diffkiln.cli",
            "optimize",
            str(folder),
            *args,
            "--calib-size",
            "8",
            "--steps",
            "4",
            "--out",
            str(bundle),
            "--overwrite",
            "--no-progress",
            "--cache-dir",
            str(a.work / "cache"),
        ]
        start = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        row: dict[str, Any] = {
            "class": name,
            "call_kwargs": call_kwargs,
            "rc": proc.returncode,
            "optimize_seconds": round(time.perf_counter() - start, 1),
        }
        if proc.returncode == 0:
            manifest = json.loads((bundle / "manifest.json").read_text())
            fp, q = load_pipeline(str(folder)), load_pipeline(str(bundle))
            outputs = _per_call(fp, q, call_kwargs, manifest["pipeline"]["denoiser"])
            row.update(
                pipeline=manifest["pipeline"]["class"],
                denoiser=manifest["pipeline"]["denoiser_class"],
                quantized_layers=len(manifest["quant"]["layers"]),
                fp_layers={n: r.split(":")[0] for n, r in manifest["quant"]["fp_layers"].items()},
                per_call_sqnr_db=outputs[0],
            )
            if experts := sorted(manifest.get("experts") or {}):
                row["expert_per_call_sqnr_db"] = {e: _per_call(fp, q, call_kwargs, e)[0] for e in experts}
            if len(outputs) > 1:  # a prediction per jointly denoised latent (LTX-2's audio)
                row["further_outputs_per_call_sqnr_db"] = outputs[1:]
            tiled, single = name in TILED_VAE, name in ONE_CLIP_PER_DECODE
            row["report"] = _report(bundle, a.work / f"{name}-report", tiled, single)
            if tiled:
                row["report_without_vae_tiling"] = _report(bundle, a.work / f"{name}-report-untiled", False)
            if single:  # the error line that names the option
                row["report_two_per_call"] = _report(bundle, a.work / f"{name}-report-two", tiled)
            row["onnx"] = _onnx(bundle, a.work / f"{name}-onnx")
            calls = [*row["per_call_sqnr_db"], *(v for e in row.get("expert_per_call_sqnr_db", {}).values() for v in e),
                     *(v for o in outputs[1:] for v in o)]  # fmt: skip
            row["ok"] = min(calls) >= MIN_CALL_SQNR_DB and row["report"]["rc"] == 0
        else:
            row["error"] = proc.stderr.strip().splitlines()[-3:]
            row["ok"] = False
        rows.append(row)
        print(json.dumps(row), flush=True)
    if a.out:  # the rows of other classes, from an earlier run, are kept
        ran = {r["class"] for r in rows}
        kept = [r for r in json.loads(a.out.read_text()) if r["class"] not in ran] if a.out.is_file() else []
        order = list(CLASSES)
        merged = sorted([*kept, *rows], key=lambda r: order.index(r["class"]) if r["class"] in order else len(order))
        a.out.write_text(json.dumps(merged, indent=2) + "\n")
    print(f"{sum(r['ok'] for r in rows)} of {len(rows)} classes within {MIN_CALL_SQNR_DB} dB on every call")


if __name__ == "__main__":
    main()
