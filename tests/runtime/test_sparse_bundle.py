"""Sparse-attention masks from `optimize` to the runtime: alone (float weights), with W8A8, and with
W8A8 and a cache schedule in one bundle, on a diffusers folder of the shapes-video architecture
(1,088 tokens per attention layer)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from diffkiln.api import CacheConfig, OptimizeConfig, SparseConfig, W8A8Config, optimize
from diffkiln.core.cache_schedule import CacheSchedule
from diffkiln.core.sparse_plan import SparsePlan
from diffkiln.runtime import load
from tests.runtime_e2e_helpers import VIDEO_KW, random_video_folder

KW = VIDEO_KW


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return random_video_folder(tmp_path_factory.mktemp("video"))


@pytest.fixture(scope="module")
def sparse_bundle(folder: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One float-weight sparse bundle at density 0.5, shared by the ONNX and report tests."""
    root = tmp_path_factory.mktemp("sparse")
    config = OptimizeConfig(out=root / "b", recipe=SparseConfig(density=0.5, validate_samples=1), calib_size=2, steps=4,
                            call_kwargs=KW, progress=False, cache_dir=root / "c")  # fmt: skip
    return optimize(str(folder), config)


def _latents(pipe: object) -> torch.Tensor:
    pipe.set_progress_bar_config(disable=True)  # type: ignore[attr-defined]
    return pipe("a red circle moving right", num_inference_steps=4, output_type="latent",  # type: ignore[operator]
                generator=torch.Generator().manual_seed(0), **dict(KW)).frames  # fmt: skip


# CI: masks beside W8A8 layers; the sparse recipe alone (the same search and hooks, float layers)
# in ``make test-slow``.
@pytest.mark.parametrize("recipe", [pytest.param("sparse", marks=pytest.mark.slow), "w8a8+sparse"])
def test_masks_go_from_the_search_into_the_bundle_and_run(folder: Path, tmp_path: Path, recipe: str) -> None:
    sparse = SparseConfig(density=0.35, validate_samples=1)
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


def test_masks_and_a_cache_schedule_in_one_w8a8_bundle(folder: Path, tmp_path: Path) -> None:
    """What ``--recipe w8a8 --attn-density 0.35 --cache-budget 0.6`` builds: both searches in one
    bundle; a reusing step skips its blocks' attention, and every step that runs a masked layer runs
    it masked."""
    sparse = SparseConfig(density=0.35, validate_samples=1)
    config = OptimizeConfig(out=tmp_path / "b", recipe=W8A8Config(), sparse=sparse,
                            cache=CacheConfig(budget=0.6, validate_samples=1, refine=0), calib_size=2, steps=4,
                            call_kwargs=KW, progress=False, cache_dir=tmp_path / "c")  # fmt: skip
    bundle = optimize(str(folder), config)
    manifest = json.loads((bundle / "manifest.json").read_text())
    plan, schedule = SparsePlan.from_dict(manifest["sparsity"]), CacheSchedule.from_dict(manifest["cache"])
    assert plan.layers and plan.density <= 0.35 + 1e-9 and not all(schedule.compute)
    assert plan.search["under_cache_schedule"] == schedule.pattern  # the masks were validated under it
    pipe = load(bundle, "cpu")
    masked = _latents(pipe)
    assert torch.isfinite(masked).all()
    cache, sparse = pipe.diffkiln_cache, pipe.diffkiln_sparse
    # Both count the pipeline's denoiser calls per step (here its two guidance branches).
    assert cache.evaluated == plan.calls_per_step * schedule.block_evaluations()
    assert cache.compute_fraction == schedule.compute_fraction
    reused = schedule.blocks[schedule.start : schedule.end]
    skipped = sum(any(lm.layer.startswith(f"{b}.") for b in reused) for lm in plan.layers)
    assert skipped > 0  # a reusing step leaves masked layers out
    expected = {s: (len(plan.layers) - (0 if c else skipped)) * plan.calls_per_step
                for s, c in enumerate(schedule.compute)}  # fmt: skip
    assert sparse.masked_by_step == {s: n for s, n in expected.items() if n}
    assert sparse.denoiser_calls == len(schedule.compute) * plan.calls_per_step
    # The budget counts the attention that runs: the density measured as it ran is the plan's.
    assert sparse.density == pytest.approx(plan.density, rel=1e-6)


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

    # Static shapes: one trace and no second-shape check; the note does not depend on them.
    out = convert(sparse_bundle, OnnxExportConfig(tmp_path / "onnx", progress=False, components=False, dynamic=False))
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


# Slow tier: CI runs the sweep machinery in test_cli_optimize.py (mixed), test_cache_bundle.py
# (cache) and test_sparse_under_cache.py (masks under each bundle's schedule); this is the
# attention sweep from the command line, with its evaluation (a minute and more on two cores).
@pytest.mark.slow
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
    data = json.loads((tmp_path / "s" / "sweep.json").read_text())
    rows = {r["name"]: r for r in data["rows"]}
    assert {"sparse-0.6", "sparse-0.4"} <= set(rows)
    # The density the kernels measured, which the Pareto plot puts on its x axis.
    assert data["swept"] == "attention_density"
    for name, planned in densities.items():
        assert rows[name]["attention_density"] == pytest.approx(planned, abs=0.02), (name, rows[name])
    assert "attention density (kept attention FLOPs" in (tmp_path / "s" / "sweep.html").read_text()
