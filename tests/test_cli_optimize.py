"""CLI: optimize -> inspect -> generate and report on the bundle, on a local diffusers folder."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from diffkiln.cli import main


@pytest.fixture(scope="module")
def bundle(random_unet_folder: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("cli-bundle") / "b"
    code = main(
        [
            "optimize",
            str(random_unet_folder),
            "--recipe",
            "w8a8",
            "--calib-size",
            "3",
            "--steps",
            "3",
            "--out",
            str(out),
            "--cache-dir",
            str(out.parent / "cache"),
            "--no-progress",
        ]
    )
    assert code == 0
    return out


def test_optimize_writes_a_bundle_and_refuses_to_overwrite(bundle: Path, random_unet_folder: Path) -> None:
    assert (bundle / "manifest.json").is_file()
    assert (
        main(
            [
                "optimize",
                str(random_unet_folder),
                "--out",
                str(bundle),
                "--calib-size",
                "1",
                "--steps",
                "1",
                "--no-progress",
            ]
        )
        == 2
    )


def test_inspect_summarizes(bundle: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["inspect", str(bundle), "--json"]) == 0
    s = json.loads(capsys.readouterr().out)
    assert s["layers_by_bits"]["W8A8"] > 10 and s["layers_by_bits"]["FP"] >= 2
    assert s["bos"]["positions"] == [0]
    assert 0 <= s["smoothed_layers"] <= s["layers_by_bits"]["W8A8"]
    assert 0.4 < s["denoiser_bytes"] / s["denoiser_fp16_bytes"] < 0.6


def _report(bundle: Path, out: Path, *extra: str) -> int:
    return main(
        [
            "report",
            str(bundle),
            "--judge",
            "shapes",
            "--eval-size",
            "1",
            "--steps",
            "2",
            "--out",
            str(out),
            "--no-progress",
            *extra,
        ]
    )


def test_generate_and_report_on_the_bundle_with_regression_gate(bundle: Path, tmp_path: Path) -> None:
    assert (
        main(
            [
                "generate",
                str(bundle),
                "--prompt",
                "a red circle on the left",
                "--steps",
                "2",
                "--out",
                str(tmp_path / "g"),
                "--no-progress",
            ]
        )
        == 0
    )
    assert len(list((tmp_path / "g").glob("*.png"))) == 1
    out = tmp_path / "r"
    assert _report(bundle, out) == 0
    data = json.loads((out / "report.json").read_text())
    for key in ("fidelity", "size", "latency", "memory", "plan", "baseline", "per_layer_sqnr_db"):
        assert key in data
    assert data["fidelity"]["latent_sqnr_db"] > 5
    assert data["fidelity"]["latent_sqnr_db_median_prompt"] >= data["fidelity"]["latent_sqnr_db_worst_prompt"]
    assert data["fidelity"]["prompts_below_10db"] in (0, 1, 2)
    assert data["plan"]["simulated"] is False
    # BOS-aware against the same plan rebuilt without BOS-awareness, on the same prompts.
    cmp = data["bos_comparison"]
    assert cmp["bos_aware"]["latent_sqnr_db"] == data["fidelity"]["latent_sqnr_db"]
    assert cmp["no_bos"]["latent_sqnr_db"] > 5 and "content_accuracy" in cmp["no_bos"]
    html = (out / "report.html").read_text()
    assert "<svg" in html and "Per-layer SQNR" in html and "without BOS-awareness" in html
    # The gate passes against itself, and fails against a report that claims better quality.
    assert (
        _report(bundle, tmp_path / "r2", "--no-bos-comparison", "--fail-on-regression", str(out / "report.json")) == 0
    )
    assert "bos_comparison" not in json.loads((tmp_path / "r2" / "report.json").read_text())
    better = dict(data, fidelity=dict(data["fidelity"], latent_sqnr_db=data["fidelity"]["latent_sqnr_db"] + 50))
    (tmp_path / "better.json").write_text(json.dumps(better))
    assert _report(bundle, tmp_path / "r3", "--fail-on-regression", str(tmp_path / "better.json")) == 3


def test_inspect_of_a_corrupt_bundle_is_a_clean_error(bundle: Path, tmp_path: Path, capsys) -> None:
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(bundle, bad)
    (bad / "manifest.json").write_text("{")
    assert main(["inspect", str(bad)]) == 2
    assert "not valid JSON" in capsys.readouterr().err
