"""LTX-2 denoises a video latent and an audio latent in one transformer and returns a prediction for
each. The audio latent was taken for conditioning: its stream's own attention stayed in floating
point as a "conditioning embedder", its output projection was quantized, and the mixed recipe's
sensitivities and the cache search measured the video prediction alone."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch

from diffkiln.api import OptimizeConfig, optimize
from diffkiln.core.metrics import sqnr_db
from diffkiln.generation import load_pipeline
from diffkiln.optimizer import W8A8Config
from diffkiln.runtime import ParallelConfig, load
from diffkiln.zoo.architectures.audio_video import tiny_ltx2
from tests.matrix.builders import save_built
from tests.matrix.per_call import HELD_OUT_PROMPT, per_call_sqnr
from tests.two_ranks import start_two

CALL = {"height": 32, "width": 32, "num_frames": 5, "frame_rate": 25.0, "max_sequence_length": 16}
STEPS = 3
# Per-call SQNR of the W8A8 denoiser against FP on a held-out prompt, each prediction apart:
# measured 30.4-51.7 dB (video) and 33.7-52.3 dB (audio; 18.1-40.7 with the audio latent taken for
# conditioning).
MIN_CALL_SQNR_DB = 25.0
# CFG parallel against one process: the batched guidance call runs half on each rank.
MIN_PARALLEL_SQNR_DB = 40.0
# Two calls per step: both guidance branches batched in one, modality guidance alone in the other.
TWO_CALLS = {"guidance_scale": 3.0, "stg_scale": 0.0, "audio_stg_scale": 0.0}
# The pipeline's own guidance: three calls per step, each of another form (guidance, spatio-temporal
# guidance with its perturbed blocks, modality isolation).
DEFAULT_GUIDANCE: dict[str, float] = {}
# The onnxruntime pipeline against the bundle's torch pipeline over all three forms, on two prompts:
# measured above 55 dB (video) and 37.0-45.0 dB (audio, whose guidance scale of 7 amplifies the
# few codes that float rounding moves); the denoiser's own graph run for every call: 5.7-6.9 dB.
MIN_ONNX_SQNR_DB = 30.0


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("joint-latents")
    folder = save_built(tiny_ltx2, root / "folder")
    config = OptimizeConfig(out=root / "bundle", recipe=W8A8Config(), calib_size=2, steps=STEPS, progress=False,
                            call_kwargs=tuple(CALL.items()), cache_dir=root / "cache")  # fmt: skip
    return folder, optimize(str(folder), config)


def test_the_audio_stream_is_quantized_between_its_own_projections(built: tuple[Path, Path]) -> None:
    quant = json.loads((built[1] / "manifest.json").read_text())["quant"]
    assert quant["fp_layers"]["audio_proj_in"].startswith("input projection")
    assert quant["fp_layers"]["audio_proj_out"].startswith("output projection")
    audio_attention = {n for n in quant["layers"] if ".audio_attn1." in n}
    assert len(audio_attention) == 2 * 4, sorted(quant["layers"])  # q, k, v, out of both blocks


@pytest.mark.parametrize("output", [0, 1], ids=["video", "audio"])
def test_each_prediction_stays_close_call_by_call(built: tuple[Path, Path], output: int) -> None:
    fp, q = load_pipeline(str(built[0])), load_pipeline(str(built[1]))
    sqnr = per_call_sqnr(fp, q, CALL, steps=STEPS, output=output)
    assert len(sqnr) == 3 * STEPS  # guidance, spatio-temporal and modality calls at every step
    assert min(sqnr) >= MIN_CALL_SQNR_DB, sqnr


def _latents(pipe: Any, guidance: dict[str, float] = TWO_CALLS) -> tuple[torch.Tensor, torch.Tensor]:
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        out = pipe(HELD_OUT_PROMPT, num_inference_steps=STEPS, output_type="latent",
                   generator=torch.Generator().manual_seed(7), **CALL, **guidance)  # fmt: skip
    return out.frames, out.audio


def _rank(rank: int, bundle: str, store: str, out: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        pipe = load(bundle, device="cpu", parallel=ParallelConfig(cfg=True))
        torch.save(_latents(pipe), Path(out) / f"rank{rank}.pt")
        run = pipe.diffkiln_parallel
        (Path(out) / f"rank{rank}.json").write_text(json.dumps([run.split_calls, run.whole_calls]))
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(os.environ.get("DIFFKILN_NO_SPAWN") == "1", reason="no process spawning here")
def test_cfg_parallel_gathers_both_predictions(built: tuple[Path, Path], tmp_path: Path) -> None:
    reference = _latents(load(built[1], device="cpu"))
    start_two(_rank, (str(built[1]), str(tmp_path / "store"), str(tmp_path)))
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    # The batched call splits over the ranks; the modality call (batch 1) runs whole on each.
    assert [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)] == [[STEPS, STEPS]] * 2
    for latent, name in enumerate(("video", "audio")):
        assert torch.equal(ranks[0][latent], ranks[1][latent]), name
        got = sqnr_db(reference[latent].numpy(), ranks[0][latent].numpy())
        assert got >= MIN_PARALLEL_SQNR_DB, (name, got)


@pytest.mark.slow
def test_the_onnx_pipeline_returns_both_latents_through_every_call_form(built: tuple[Path, Path],
                                                                         tmp_path: Path) -> None:  # fmt: skip
    # The denoiser graph used to hold the video prediction alone, and to fix the first call's
    # options: the spatio-temporal and modality-isolation guidance calls had no graph.
    from diffkiln.export.onnx import OnnxExportConfig, export_onnx
    from diffkiln.runtime import open_bundle
    from diffkiln.runtime.inspect_onnx import format_onnx_summary, summarize_onnx

    out = export_onnx(open_bundle(built[1]), OnnxExportConfig(tmp_path / "onnx", progress=False))
    entry = json.loads((out / "manifest.json").read_text())["components"]["transformer"]
    assert [f for f, _ in entry["output_fields"]] == ["sample", "audio_sample"]
    forms = [entry["options"], *(v["options"] for v in entry["variants"])]
    assert sorted((f["isolate_modalities"], "spatio_temporal_guidance_blocks" in f) for f in forms) == [
        (False, False), (False, True), (True, False)]  # fmt: skip
    assert all(g["dynamic"] and g["check"]["ok"] for g in [entry, *entry["variants"]])
    # Every axis dynamic fails for LTX-2 (its patch coordinates' fixed axis): the variants start at
    # the attempt that passed for the first form, and try no other.
    assert len(entry["wider_axes_failed"]) == 2, entry["wider_axes_failed"]
    assert all(v["check"]["attempt"] == entry["check"]["attempt"] and not v.get("wider_axes_failed")
               for v in entry["variants"])  # fmt: skip
    lines = format_onnx_summary(summarize_onnx(out), out)  # what ``diffkiln inspect`` prints
    assert "outputs  transformer: sample, audio_sample (a prediction each)" in lines, lines
    assert any(line.startswith("variant  transformer:") and "isolate_modalities=True" in line for line in lines)
    reference, got = _latents(load(built[1]), DEFAULT_GUIDANCE), _latents(load(out, backend="onnxruntime"),
                                                                          DEFAULT_GUIDANCE)  # fmt: skip
    for latent, name in enumerate(("video", "audio")):
        db = sqnr_db(reference[latent].numpy(), got[latent].numpy())
        assert db >= MIN_ONNX_SQNR_DB, (name, db)
