"""A VAE that decodes only in tiles (Allegro's raises unless ``enable_tiling()`` was called): without
``--vae-tiling`` a run fails with one line naming the VAE and the option; with it, the bundle
generates and its report measures it against FP, both decoded in tiles."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from diffusers import AllegroPipeline, AllegroTransformer3DModel, AutoencoderKLAllegro, EulerAncestralDiscreteScheduler

from diffkiln.api import OptimizeConfig, optimize
from diffkiln.cli import main
from diffkiln.report import ReportConfig, report
from diffkiln.zoo.architectures.components import t5_encoder, t5_tokenizer
from tests.matrix.builders import save_built

CALL = {"height": 32, "width": 32, "num_frames": 9, "max_sequence_length": 16, "clean_caption": False}
# Latents of the W8A8 bundle against FP, same prompts and seeds: measured 47.4 dB.
MIN_LATENT_SQNR_DB = 30.0


def _allegro(scratch: Path) -> AllegroPipeline:
    """Allegro text-to-video at toy widths: T5, a 3D transformer, a video VAE (4 levels, 4x temporal)."""
    tok = t5_tokenizer(scratch / "tokenizer")
    transformer = AllegroTransformer3DModel(num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=4,
                                            num_layers=1, cross_attention_dim=24, sample_width=8, sample_height=8,
                                            sample_frames=8, caption_channels=24)  # fmt: skip
    vae = AutoencoderKLAllegro(down_block_types=("AllegroDownBlock3D",) * 4, up_block_types=("AllegroUpBlock3D",) * 4,
                               block_out_channels=(8, 8, 8, 8), latent_channels=4, layers_per_block=1,
                               norm_num_groups=2, temporal_compression_ratio=4)  # fmt: skip
    return AllegroPipeline(transformer=transformer, vae=vae, scheduler=EulerAncestralDiscreteScheduler(),
                           text_encoder=t5_encoder(tok, 24), tokenizer=tok)  # fmt: skip


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("allegro")
    folder = save_built(_allegro, root / "pipe")
    # Calibration samples latents: it never decodes, tiles or not.
    config = OptimizeConfig(out=root / "b", calib_size=2, steps=2, progress=False, call_kwargs=tuple(CALL.items()))
    return optimize(str(folder), config)


def test_without_tiling_the_vae_is_named_with_the_option(bundle: Path, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture) -> None:  # fmt: skip
    argv = ["generate", str(bundle), "--prompt", "a red circle", "--steps", "2", "--out", str(tmp_path / "g"),
            "--no-progress"]  # fmt: skip
    assert main(argv) == 1
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, errors
    assert "AllegroPipeline failed in its vae (AutoencoderKLAllegro._decode): NotImplementedError" in errors[0]
    assert "--vae-tiling" in errors[0]
    assert not (tmp_path / "g").exists()  # nothing written


def test_with_tiling_the_bundle_generates_and_is_measured_against_fp(bundle: Path, tmp_path: Path) -> None:
    argv = ["generate", str(bundle), "--prompt", "a red circle", "--steps", "2", "--out", str(tmp_path / "g"),
            "--no-progress", "--vae-tiling"]  # fmt: skip
    assert main(argv) == 0
    assert len(list((tmp_path / "g").iterdir())) >= 1
    config = ReportConfig(eval_size=2, steps=2, progress=False, vae_tiling=True)
    json_path, _ = report(bundle, config, tmp_path / "r")
    fidelity = json.loads(json_path.read_text())["fidelity"]
    print(f"allegro W8A8: latent SQNR {fidelity['latent_sqnr_db']:.1f} dB")
    assert fidelity["latent_sqnr_db"] >= MIN_LATENT_SQNR_DB


def test_onnx_export_of_the_denoiser_decodes_nothing(bundle: Path, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture) -> None:  # fmt: skip
    # The whole pipeline: the export's recorded call decodes, untiled: one line, naming the way out.
    assert main(["export", str(bundle), "--out", str(tmp_path / "all"), "--no-progress"]) == 1
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "AutoencoderKLAllegro._decode" in errors[0] and "--denoiser-only" in errors[0]
    assert not (tmp_path / "all").exists()
    # The denoiser alone: recorded from a call that stops at the latents.
    argv = ["export", str(bundle), "--denoiser-only", "--out", str(tmp_path / "den"), "--no-progress"]
    assert main(argv) == 0
    entry = json.loads((tmp_path / "den" / "manifest.json").read_text())["components"]["transformer"]
    print(f"allegro ONNX denoiser: dynamic axes {entry['dynamic_axes']}, check {entry['check']}")
    assert entry["check"]["ok"] and entry["check"]["sqnr_db"] >= 60.0
