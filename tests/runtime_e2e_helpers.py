"""Helpers shared by end-to-end quantization tests."""

from __future__ import annotations

import atexit
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from diffkiln.calibrate import CalibrationConfig, calibrate
from diffkiln.nn.freeze import apply_plan
from diffkiln.optimizer import SearchContext, W8A8Config, make_plan
from diffkiln.zoo.shapes_video_model import VIDEO_TEXT_LENGTH, assemble_shapes_video

# Shared calibration cache: tests that calibrate the same pipeline with the same settings reuse it;
# removed when the process ends.
CACHE = Path(tempfile.mkdtemp(prefix="diffkiln-test-calib-"))
atexit.register(shutil.rmtree, CACHE, ignore_errors=True)

PROMPTS = (
    "a red circle on the left",
    "a blue square above a green triangle",
    "a yellow circle at the top",
    "a green square right of a red triangle",
)


def quantize_in_memory(pipe: Any, config: W8A8Config, steps: int = 4) -> tuple[Any, Any]:
    """(quantized copy of pipe, plan): calibrate, plan, freeze and swap, without a bundle."""
    stats = calibrate(pipe, CalibrationConfig(PROMPTS, steps=steps, batch_size=4, cache_dir=CACHE, progress=False))
    plan = make_plan(pipe, stats, config, SearchContext(source_id="test"))
    return apply_plan(pipe, plan, stats), plan


def latents(pipe: Any, prompts: tuple[str, ...], steps: int = 4) -> torch.Tensor:
    gens = [torch.Generator().manual_seed(100 + i) for i in range(len(prompts))]
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        return pipe(list(prompts), num_inference_steps=steps, generator=gens, output_type="latent").images


def build_bundle(pipe: Any, config: W8A8Config, out: Any, steps: int = 4, **export: Any) -> tuple[Any, Any]:
    """Calibrate, plan and export a bundle to ``out`` (``export``: more ExportConfig fields);
    returns (bundle path, plan)."""
    from diffkiln.export import ExportConfig, export_bundle

    stats = calibrate(pipe, CalibrationConfig(PROMPTS, steps=steps, batch_size=4, cache_dir=CACHE, progress=False))
    plan = make_plan(pipe, stats, config, SearchContext(source_id="test"))
    return export_bundle(pipe, plan, stats, ExportConfig(out, **export)), plan


def build_packed_bundle(pipe: Any, out: Any, specs: Any, steps: int = 4) -> tuple[Any, Any]:
    """A bundle whose quantized layers take the weight specs ``specs`` in turn (W*A8, float16
    storage): sub-byte layouts in one model. Returns (bundle path, plan)."""
    import dataclasses

    from diffkiln.export import ExportConfig, FloatStorage, export_bundle

    stats = calibrate(pipe, CalibrationConfig(PROMPTS, steps=steps, batch_size=4, cache_dir=CACHE, progress=False))
    plan = make_plan(pipe, stats, W8A8Config(), SearchContext(source_id="t"))
    layers = tuple(
        dataclasses.replace(lp, weight=specs[i % len(specs)]) if lp.quantized else lp
        for i, lp in enumerate(plan.layers)
    )
    plan = dataclasses.replace(plan, layers=layers)
    return export_bundle(pipe, plan, stats, ExportConfig(out, float_storage=FloatStorage.FLOAT16)), plan


def onnx_denoiser(bundle: Any, config: Any) -> Path:
    """Export only a bundle's denoiser to ONNX (through the public ``convert``); its file."""
    import dataclasses

    from diffkiln.api import convert

    return convert(bundle, dataclasses.replace(config, components=False)) / "denoiser.onnx"


# The call arguments of a random-weight shapes-video folder at 16 frames: 1,088 tokens per attention
# layer, long enough for block masks.
VIDEO_KW = (("height", 64), ("width", 64), ("num_frames", 16), ("max_sequence_length", VIDEO_TEXT_LENGTH))


def random_video_folder(root: Path) -> Path:
    """A diffusers folder of the shapes-video architecture with random weights (seed 0), under ``root``."""
    torch.manual_seed(0)
    path = root / "pipe"
    assemble_shapes_video(root / "scratch").save_pretrained(path)
    return path
