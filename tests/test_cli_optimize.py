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
    assert s["requantized_outputs"] == 0  # only with --requantize-conv-outputs
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
    # The bundle smooths (the default), so the pair is also built without smoothing, where a BOS
    # outlier that smoothing could move into the weights stays in the activations.
    assert json.loads((bundle / "manifest.json").read_text())["plan"]["notes"]["recipe_config"]["smooth"] == "auto"
    off = cmp["smoothing_off"]
    assert off["bos_aware"]["latent_sqnr_db"] > 5 and off["no_bos"]["latent_sqnr_db"] > 5
    html = (out / "report.html").read_text()
    assert "<svg" in html and "Per-layer SQNR" in html and "without BOS-awareness" in html
    assert "SmoothQuant off" in html
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
    assert main(["inspect", str(bad)]) == 1  # a failure, not a usage error: the bundle fails its checks
    assert "not valid JSON" in capsys.readouterr().err


_MIXED_FAST = ["--calib-size", "2", "--steps", "2", "--sensitivity-prompts", "1", "--no-progress"]


def test_mixed_sweep_and_sensitivity_from_the_command_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # tiny-pixart (25 layers) keeps the ~100 sensitivity trials and five bundles to seconds.
    cache = ["--cache-dir", str(tmp_path / "cache")]
    out = tmp_path / "sweep"
    args = ["optimize", "tiny-pixart", "--recipe", "mixed", "--sweep", "5,8", "--sweep-eval-size", "1"]
    assert main([*args, "--out", str(out), *cache, *_MIXED_FAST]) == 0
    data = json.loads((out / "sweep.json").read_text())
    rows = {r["name"]: r for r in data["rows"]}
    assert data["swept"] == "avg_weight_bits"
    # No judge: no FP accuracy row. mixed-at-uniform-w4a8 spends uniform W4A8's stored bits.
    assert set(rows) == {"mixed-w5", "mixed-w8", "uniform-w4a8", "w8a8", "mixed-at-uniform-w4a8"}
    matched, uniform = rows["mixed-at-uniform-w4a8"], rows["uniform-w4a8"]
    assert matched["avg_stored_weight_bits"] <= uniform["avg_stored_weight_bits"] + 1e-9
    assert matched["denoiser_bytes"] <= uniform["denoiser_bytes"]
    assert rows["mixed-w5"]["avg_weight_bits"] <= 5.0 + 1e-9 < rows["mixed-w8"]["avg_weight_bits"] <= 8.0 + 1e-9
    assert rows["mixed-w5"]["size_ratio_vs_fp16"] < rows["w8a8"]["size_ratio_vs_fp16"]
    assert rows["mixed-w5"]["resident_bytes"] < rows["w8a8"]["resident_bytes"]
    html = (out / "sweep.html").read_text()
    assert html.count("<svg") == 2 and "Per-layer weight bits" in html
    # The sensitivity command reads the same analysis back from the cache.
    sens = tmp_path / "sens"
    capsys.readouterr()
    sens_args = ["sensitivity", "tiny-pixart", "--out", str(sens), "--top", "5"]
    assert main([*sens_args, *cache, *_MIXED_FAST]) == 0
    printed = capsys.readouterr().out
    assert "content" in printed and "quality" in printed and "simulated" in printed
    table = json.loads((sens / "sensitivity.json").read_text())
    assert table["format"] == "diffkiln.sensitivity" and len(table["entries"]) > 50


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--recipe", "mixed", "--avg-weight-bits", "1"], "2..16"),
        (["--recipe", "mixed", "--weight-bits", "4"], "--weight-bits does not apply to --recipe mixed"),
        (["--recipe", "mixed", "--weight-candidates", "5,16"], "2, 3, 4, 8, 16"),
        (["--recipe", "w8a8", "--weight-bits", "4"], "--recipe mixed"),
        (["--recipe", "w8a8", "--sweep", "4"], "use --recipe mixed"),
        (["--recipe", "w8a8", "--avg-weight-bits", "4"], "--avg-weight-bits does not apply to --recipe w8a8"),
        (["--recipe", "w4"], "unknown recipe 'w4'; valid: cache, mixed, sparse, w8a8"),
    ],
    ids=[
        "mixed-1-bit",
        "mixed-grid-option",
        "mixed-3-bit-candidate",
        "w8a8-4-bits",
        "sweep-without-mixed",
        "w8a8-average-option",
        "unknown-recipe",
    ],
)
def test_bad_mixed_options_fail_with_one_line(
    random_unet_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: list[str], message: str
) -> None:
    code = main(["optimize", str(random_unet_folder), *extra, "--out", str(tmp_path / "b"), "--no-progress"])
    assert code == 2
    assert message in capsys.readouterr().err


def test_optimize_target_mindiesd_plans_linear_layers_only(random_unet_folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "b"
    argv = ["optimize", str(random_unet_folder), "--target", "mindiesd", "--calib-size", "1", "--steps", "1",
            "--out", str(out), "--cache-dir", str(tmp_path / "cache"), "--no-progress"]  # fmt: skip
    assert main(argv) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["build_metrics"]["deploy_target"] == "mindiesd"
    kinds = {layer["meta"]["kind"] for layer in manifest["quant"]["layers"].values()}
    assert kinds == {"linear"}, kinds
