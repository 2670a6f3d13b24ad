"""One CLI for every artifact: generate, report and inspect take an ONNX export folder as they take
a bundle, and run it in onnxruntime."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from diffkiln.cli import main


def test_inspect_an_onnx_export(unet_onnx: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["inspect", str(unet_onnx)]) == 0
    out = capsys.readouterr().out
    assert "runs in onnxruntime" in out and "graph    unet (denoiser): denoiser.onnx" in out
    assert main(["inspect", str(unet_onnx), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["kind"] == "onnx" and summary["opset"] == 21 and summary["recipe"] == "w8a8"
    assert summary["graphs"]["unet"]["check_sqnr_db"] > 30  # the export's own check against torch


def test_generate_and_report_run_an_onnx_export(unet_onnx: Path, tmp_path: Path, capsys) -> None:
    argv = ["generate", str(unet_onnx), "--prompt", "a red circle on the left", "--steps", "4"]
    assert main([*argv, "--out", str(tmp_path / "g"), "--no-progress"]) == 0
    (png,) = (tmp_path / "g").glob("*.png")
    assert Image.open(png).size == (64, 64)  # shapes-unet's images
    # The bundle was built with source id "test": the baseline is named, and must be the same weights.
    argv = ["report", str(unet_onnx), "--baseline", "shapes-unet", "--eval-size", "2", "--steps", "4"]
    assert main([*argv, "--out", str(tmp_path / "r"), "--no-progress"]) == 0
    assert "evaluated on the shapes judge's evaluation sets (6 prompts)" in capsys.readouterr().out
    data = json.loads((tmp_path / "r" / "report.json").read_text())
    assert data["plan"]["runtime"].startswith("onnxruntime, opset 21")
    assert data["fidelity"]["latent_sqnr_db"] > 12.0  # measured 15.0 dB (QDQ in onnxruntime, 4 steps)
    assert 0.3 < data["size"]["denoiser_ratio_vs_fp16"] < 0.7  # measured 0.56
    assert (tmp_path / "r" / "report.html").stat().st_size > 1000
    (tmp_path / "p.txt").write_text("a red circle\n")
    other = [*argv[:3], "tiny-sd3", "--eval-prompts", str(tmp_path / "p.txt"), "--steps", "4"]
    assert main([*other, "--out", str(tmp_path / "r2")]) == 2
    assert "is a StableDiffusion3Pipeline, the bundle a StableDiffusionPipeline" in capsys.readouterr().err
