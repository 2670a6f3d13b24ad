"""Sparse-attention masks from `optimize` to the runtime: alone (float weights) and with W8A8, on a
diffusers folder of the shapes-video architecture (1,088 tokens per attention layer)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from diffkiln.api import OptimizeConfig, SparseConfig, W8A8Config, optimize
from diffkiln.core.sparse_plan import SparsePlan
from diffkiln.runtime import load
from diffkiln.zoo.shapes_video_model import VIDEO_TEXT_LENGTH, assemble_shapes_video

KW = (("height", 64), ("width", 64), ("num_frames", 16), ("max_sequence_length", VIDEO_TEXT_LENGTH))


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("video") / "pipe"
    assemble_shapes_video(path.parent / "scratch").save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def sparse_bundle(folder: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One float-weight sparse bundle at density 0.5, shared by the ONNX and report tests."""
    root = tmp_path_factory.mktemp("sparse")
    config = OptimizeConfig(out=root / "b", recipe=SparseConfig(density=0.5), calib_size=2, steps=4,
                            call_kwargs=KW, progress=False, cache_dir=root / "c")  # fmt: skip
    return optimize(str(folder), config)


def _latents(pipe: object) -> torch.Tensor:
    pipe.set_progress_bar_config(disable=True)  # type: ignore[attr-defined]
    return pipe("a red circle moving right", num_inference_steps=4, output_type="latent",  # type: ignore[operator]
                generator=torch.Generator().manual_seed(0), **dict(KW)).frames  # fmt: skip


@pytest.mark.parametrize("recipe", ["sparse", "w8a8+sparse"])
def test_masks_go_from_the_search_into_the_bundle_and_run(folder: Path, tmp_path: Path, recipe: str) -> None:
    sparse = SparseConfig(density=0.35)
    config = OptimizeConfig(out=tmp_path / "b", recipe=sparse if recipe == "sparse" else W8A8Config(),
                            sparse=None if recipe == "sparse" else sparse, calib_size=2, steps=4, call_kwargs=KW,
                            progress=False, cache_dir=tmp_path / "c")  # fmt: skip
    bundle = optimize(str(folder), config)
    manifest = json.loads((bundle / "manifest.json").read_text())
    plan = SparsePlan.from_dict(manifest["sparsity"])
    assert manifest["version"] == 8 and plan.layers and plan.density <= 0.35 + 1e-9
    assert json.loads(json.dumps(plan.to_dict())) == manifest["sparsity"]  # round trip, bit for bit
    # Every proposal was sampled; the best measured one was kept.
    rows = plan.search["validated"]
    assert len(rows) >= 2 and plan.search["proposal"] == max(rows, key=lambda r: r["sqnr_db"])["proposal"]
    pipe = load(bundle, "cpu")
    masked = _latents(pipe)
    assert pipe.diffkiln_sparse.density == pytest.approx(plan.density, rel=1e-6)  # measured as it ran
    dense = _latents(load(bundle, "cpu", sparse=False))
    assert not torch.equal(masked, dense) and torch.isfinite(masked).all()


def test_cli_builds_and_inspects_a_sparse_bundle(folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from diffkiln.cli import main

    args = ["optimize", str(folder), "--recipe", "sparse", "--attn-density", "0.5", "--attn-block", "128",
            "--calib-size", "2", "--steps", "4", "--out", str(tmp_path / "b"), "--cache-dir", str(tmp_path / "c"),
            "--no-progress"]  # fmt: skip
    for k, v in KW:
        args += ["--call-arg", f"{k}={v}"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "sparse   4 attention layers, blocks of 128 tokens" in out and "recipe sparse" in out
    # Blocks of 128 are the size MindIE-SD's rain_fusion_attention takes: the export holds the masks exactly.
    assert main(["export", str(tmp_path / "b"), "--format", "mindiesd", "--out", str(tmp_path / "m")]) == 0
    meta = json.loads((tmp_path / "m" / "diffkiln_export.json").read_text())["sparse_attention"]
    assert meta["rain_fusion_attention"]["exact"] and meta["masked_density_at_128"] == meta["masked_density"]


def test_onnx_export_says_the_masks_run_dense(sparse_bundle: Path, tmp_path: Path) -> None:
    from diffkiln.api import convert
    from diffkiln.export.onnx import OnnxExportConfig

    out = convert(sparse_bundle, OnnxExportConfig(tmp_path / "onnx", progress=False, components=False))
    note = json.loads((out / "manifest.json").read_text())["sparsity_not_exported"]
    assert "run attention dense" in note


def test_mindiesd_export_writes_the_masks_as_rain_fusion_indices(sparse_bundle: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    from diffkiln.api import convert
    from diffkiln.export.mindiesd import MindieExportConfig

    out = convert(sparse_bundle, MindieExportConfig(tmp_path / "mindie"))
    plan = SparsePlan.from_dict(json.loads((sparse_bundle / "manifest.json").read_text())["sparsity"])
    config = json.loads((out / "mindiesd_sparse_attention.json").read_text())
    tensors = load_file(str(out / "mindiesd_sparse_masks.safetensors"))
    meta = json.loads((out / "diffkiln_export.json").read_text())
    assert meta["sparse_attention"]["masked_density_at_128"] >= meta["sparse_attention"]["masked_density"]
    assert [e["layer"] for e in config["layers"]] == [lm.layer for lm in plan.layers]
    for entry, lm in zip(config["layers"], plan.layers, strict=True):
        grid = lm.grid
        assert entry["sparse_attention"]["latent_shape_q"] == [grid["frames"], grid["height"], grid["width"]]
        select = tensors[f"{lm.layer}.group0.select_idx"]
        assert select.dtype == torch.int64 and select.shape == (-(-lm.q_len // 128), lm.heads, -(-lm.kv_len // 128))


def test_report_measures_the_density_as_the_kernels_ran(sparse_bundle: Path, tmp_path: Path) -> None:
    from diffkiln.report.evaluate import ReportConfig, report

    json_path, html_path = report(sparse_bundle, ReportConfig(eval_size=2, steps=4, progress=False), tmp_path / "r")
    data = json.loads(json_path.read_text())
    att = data["attention"]
    assert att["density"] == pytest.approx(att["planned_density"], abs=1e-4) and att["masked_layers"] == 4
    speed = att["speed_alone"]  # timed, not asserted (machines are noisy): present and consistent
    plan = SparsePlan.from_dict(json.loads((sparse_bundle / "manifest.json").read_text())["sparsity"])
    assert speed["layouts_timed"] == 4 * len(plan.group_starts) and speed["kernel"] == "auto"
    assert speed["speedup"] == pytest.approx(speed["dense_seconds"] / speed["masked_seconds"], rel=0.01)
    page = html_path.read_text()
    assert "Sparse attention (block-sparse kernel)" in page and "attention alone: dense / masked time" in page
    assert "Sparse attention (block-sparse kernel)" in page and page.count("<svg") >= len(att["pictures"]) > 0


def test_sweep_attn_builds_one_bundle_per_density_and_evaluates_them(folder: Path, tmp_path: Path) -> None:
    from diffkiln.cli import main

    args = ["optimize", str(folder), "--recipe", "sparse", "--sweep-attn", "0.6,0.4", "--calib-size", "2", "--steps",
            "4", "--out", str(tmp_path / "s"), "--cache-dir", str(tmp_path / "c"), "--no-progress",
            "--sweep-eval-size", "2"]  # fmt: skip
    for k, v in KW:
        args += ["--call-arg", f"{k}={v}"]
    assert main(args) == 0
    densities = {}
    for name in ("sparse-0.6", "sparse-0.4"):
        manifest = json.loads((tmp_path / "s" / name / "manifest.json").read_text())
        densities[name] = SparsePlan.from_dict(manifest["sparsity"]).density
    assert densities["sparse-0.6"] <= 0.6 + 1e-9 and densities["sparse-0.4"] <= 0.4 + 1e-9
    rows = json.loads((tmp_path / "s" / "sweep.json").read_text())
    assert {"sparse-0.6", "sparse-0.4"} <= {r["name"] for r in rows["rows"]}
