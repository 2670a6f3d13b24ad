"""A new user's mistakes, each run as the CLI in a subprocess: one ``error:`` line naming the
problem and the fix, exit status 2 (usage) or 1 (failure), no traceback, nothing lost or
half-written. docs/cli-errors.md lists the same cases."""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from diffkiln.cli import main


def _run(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "diffkiln", *args], capture_output=True, text=True, timeout=600, cwd=cwd, env=env
    )


def _refused(r: subprocess.CompletedProcess[str], status: int, message: str) -> None:
    assert "Traceback" not in r.stderr, r.stderr
    assert r.returncode == status, (r.returncode, r.stderr)
    # ours: "error: ..."; argparse's own (a malformed option): "usage: ..." then "diffkiln: error: ..."
    errors = [line for line in r.stderr.splitlines() if re.match(r"(diffkiln[\w -]*: )?error: ", line)]
    assert len(errors) == 1 and message in errors[0], r.stderr


def _tree(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def bundle(random_unet_folder: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("first-hour") / "b"
    argv = ["optimize", str(random_unet_folder), "--calib-size", "2", "--steps", "2", "--out", str(out)]
    assert main([*argv, "--cache-dir", str(out.parent / "cache"), "--no-progress"]) == 0
    return out


def test_overwrite_never_empties_a_folder_diffkiln_did_not_write(bundle: Path, tmp_path: Path) -> None:
    mine = tmp_path / "thesis"
    mine.mkdir()
    (mine / "thesis.txt").write_text("four years of work\n")
    (mine / "figures").mkdir()
    (mine / "figures" / "fig1.png").write_bytes(b"\x89PNG")
    before = _tree(mine)
    r = _run("optimize", "shapes-unet", "--recipe", "w8a8", "--out", str(mine), "--overwrite", "--calib-size", "2")
    _refused(r, 2, "holds no diffkiln manifest, so it may hold your own files")
    assert _tree(mine) == before
    a_file = tmp_path / "notes.txt"
    a_file.write_text("keep\n")
    r = _run("export", str(bundle), "--format", "mindiesd", "--out", str(a_file), "--overwrite")
    _refused(r, 2, "exists and is not a folder")
    assert a_file.read_text() == "keep\n"


def test_overwrite_replaces_a_bundle_whole_with_the_usual_modes(bundle: Path, tmp_path: Path) -> None:
    copy = tmp_path / "b"
    shutil.copytree(bundle, copy)
    empty = tmp_path / "empty"
    empty.mkdir()
    # An empty folder needs no --overwrite; a bundle is replaced only with it.
    assert main(["export", str(bundle), "--format", "mindiesd", "--out", str(empty)]) == 0
    assert (empty / "diffkiln_export.json").is_file()
    r = _run("optimize", "shapes-unet", "--out", str(copy), "--calib-size", "2", "--steps", "2", "--no-progress")
    _refused(r, 2, "already exists; pass --overwrite")
    old = os.umask(0o022)
    try:
        r = _run("optimize", "shapes-unet", "--out", str(copy), "--overwrite", "--calib-size", "2", "--steps", "2",
                 "--no-progress")  # fmt: skip
    finally:
        os.umask(old)
    assert r.returncode == 0, r.stderr
    assert '"id": "shapes-unet"' in (copy / "manifest.json").read_text()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".b.")]  # no partial or old folder left
    assert stat.S_IMODE(copy.stat().st_mode) == 0o755
    files = [p for p in copy.rglob("*") if p.is_file()]
    assert files and {stat.S_IMODE(p.stat().st_mode) for p in files} == {0o644}
    assert {stat.S_IMODE(p.stat().st_mode) for p in copy.rglob("*") if p.is_dir()} == {0o755}


def test_a_bundle_without_its_manifest(bundle: Path, tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(bundle, broken)
    (broken / "manifest.json").unlink()
    _refused(
        _run("generate", str(broken), "--prompt", "x", "--out", str(tmp_path / "g")), 1, "without its manifest.json"
    )
    _refused(_run("inspect", str(broken)), 1, "has no manifest.json")
    assert not (tmp_path / "g").exists()


@pytest.mark.parametrize(
    ("args", "status", "message"),
    [
        (["export", "{bundle}", "--format", "onnx", "--opset", "99", "--out", "{tmp}/o"], 2, "19 to 25"),
        (["generate", "{bundle}", "--prompt", "x", "--device", "cuda", "--out", "{tmp}/g"], 2, "use --device cpu"),
        (["generate", "{bundle}", "--prompt", "x", "--out", "{tmp}/a_file"], 2, "is an existing file; give a folder"),
        (["report", "{bundle}", "--out", "{tmp}/a_file"], 2, "is an existing file; give a folder"),
        (["generate", "{bundle}", "--prompt", "x", "--device", "tpu", "--out", "{tmp}/g"], 2, "unknown device 'tpu'"),
        (["report", "{bundle}", "--device", "cuda:one", "--out", "{tmp}/r"], 2, "unknown device 'cuda:one'"),
        (["--threads", "0", "inspect", "{bundle}"], 2, "must be a positive integer"),
        (["optimize", "shapes-unet", "--recipe", "mixed", "--weight-bits", "4", "--out", "{tmp}/m"], 2,
         "--weight-bits does not apply to --recipe mixed; its options: --act-candidates, --avg-act-bits, "
         "--avg-weight-bits"),
        (["optimize", "shapes-unet", "--recipe", "mixed", "--avg-weight-bits", "2", "--out", "{tmp}/m",
          "--calib-size", "2", "--steps", "2", "--no-progress"], 2, "smallest feasible average is"),
        (["inspect", "{tmp}/a_file"], 2, "is not a bundle directory"),
        # The pipeline's own check, after the progress bar has started: the error starts its own line.
        (["generate", "{bundle}", "--prompt", "x", "--call-arg", "height=7", "--call-arg", "width=7", "--out",
          "{tmp}/g"], 1, "StableDiffusionPipeline failed: ValueError: `height` and `width` have to be divisible by 8"),
    ],
    ids=["opset", "cuda-on-cpu-torch", "generate-out-file", "report-out-file", "unknown-device", "device-index",
         "threads-0",
         "mixed-weight-bits", "infeasible-budget-before-search", "inspect-a-file", "pipeline-refuses-a-call"],
)  # fmt: skip
def test_bad_arguments_are_one_line(bundle: Path, tmp_path: Path, args: list[str], status: int, message: str) -> None:
    if "cuda-on-cpu-torch" in str(args) and _cuda():
        pytest.skip("this torch sees a CUDA device")
    (tmp_path / "a_file").write_text("mine\n")
    argv = [a.format(bundle=bundle, tmp=tmp_path) for a in args]
    _refused(_run(*argv), status, message)
    assert (tmp_path / "a_file").read_text() == "mine\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]  # nothing half-written


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def test_a_users_folder_with_truncated_weights_or_a_missing_component(random_unet_folder: Path, tmp_path: Path) -> None:
    truncated = tmp_path / "truncated"
    shutil.copytree(random_unet_folder, truncated)
    weights = truncated / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    for command in (["generate", str(truncated), "--prompt", "x"], ["optimize", str(truncated), "--out", "b"]):
        _refused(_run(*command, cwd=tmp_path), 2, "diffusion_pytorch_model.safetensors is truncated")
    no_tokenizer = tmp_path / "no-tokenizer"
    shutil.copytree(random_unet_folder, no_tokenizer)
    shutil.rmtree(no_tokenizer / "tokenizer")
    message = "lists the component 'tokenizer' (CLIPTokenizer) in model_index.json but has no tokenizer/ folder"
    _refused(_run("generate", str(no_tokenizer), "--prompt", "x", cwd=tmp_path), 2, message)
    r = _run("export", str(random_unet_folder), "--format", "onnx", "--out", "o", cwd=tmp_path)
    _refused(r, 2, "is a diffusers pipeline folder, not a bundle; build one with `diffkiln optimize")
    assert not (tmp_path / "b").exists() and not (tmp_path / "out").exists() and not (tmp_path / "o").exists()


def test_a_call_argument_a_pipeline_would_swallow_is_named(tmp_path: Path) -> None:
    # StableDiffusionPipeline.__call__ takes **kwargs: a misspelt argument would vanish there.
    r = _run("generate", "shapes-unet", "--prompt", "x", "--steps", "2", "--call-arg", "heigth=32", "--out", "g",
             "--no-progress", cwd=tmp_path)  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert r.stderr.count("warning: StableDiffusionPipeline has no parameter 'heigth'") == 1
    r = _run("generate", "shapes-dit", "--prompt", "x", "--call-arg", "heigth=32", "--out", "g2", cwd=tmp_path)
    _refused(r, 2, "StableDiffusion3Pipeline takes no argument 'heigth'")


def test_report_names_its_prompts_and_refuses_another_models_baseline(
    bundle: Path, random_unet_folder: Path, tmp_path: Path
) -> None:
    r = _run("report", str(random_unet_folder), "--out", str(tmp_path / "r0"))
    _refused(r, 2, "give --eval-prompts FILE")
    r = _run("report", str(bundle), "--eval-size", "2", "--steps", "2", "--out", str(tmp_path / "r1"), "--no-progress")
    assert r.returncode == 0, r.stderr
    assert "evaluated on 2 of the bundle's 2 recorded calibration prompts" in r.stdout
    r = _run("report", str(bundle), "--baseline", "shapes-unet", "--eval-size", "1", "--out", str(tmp_path / "r2"))
    _refused(r, 2, "has other weights than the model the bundle was built from")
    r = _run("report", str(bundle), "--baseline", "tiny-sd3", "--eval-size", "1", "--out", str(tmp_path / "r3"))
    _refused(r, 2, "is a StableDiffusion3Pipeline, the bundle a StableDiffusionPipeline")
    r = _run("report", str(bundle), "--baseline", "shapes-unet", "--force-baseline", "--eval-size", "1", "--steps", "2",
             "--out", str(tmp_path / "r4"), "--no-progress")  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert not (tmp_path / "r2").exists() and not (tmp_path / "r3").exists()


def test_a_mixed_search_says_its_budget_before_it_starts(
    bundle: Path, random_unet_folder: Path, tmp_path: Path
) -> None:
    r = _run("optimize", str(random_unet_folder), "--recipe", "mixed", "--calib-size", "2", "--steps", "2",
             "--sensitivity-prompts", "1", "--select-prompts", "2", "--out", str(tmp_path / "m"),
             "--cache-dir", str(tmp_path / "cache"))  # fmt: skip
    assert r.returncode == 0, r.stderr
    lines = r.stderr.splitlines()
    announce = next(i for i, line in enumerate(lines) if line.startswith("mixed: searching"))
    assert "an average of 4 weight bits (stored bits" in lines[announce]
    first_trial = next(i for i, line in enumerate(lines) if "mixed search: sensitivity" in line)
    assert announce < first_trial
    for stage in ("calibration", "mixed search: measuring plans", "freeze: packing weights"):
        assert stage in r.stderr
