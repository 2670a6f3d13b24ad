"""CLI smoke tests and bad-input handling (clear one-line errors, exit status 2, no traceback)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from diffkiln.cli import main


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "diffkiln.cli", *args], capture_output=True, text=True, timeout=600)


def test_models_lists_every_builtin(capsys: pytest.CaptureFixture[str]) -> None:
    from diffkiln.zoo import BUILTIN_MODELS

    assert main(["models"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    names = [ln.split()[0] for ln in lines]
    assert names[:2] == ["shapes-unet", "shapes-dit"]
    assert names == list(BUILTIN_MODELS)
    assert {"tiny-sd15", "tiny-sdxl", "tiny-sd3", "tiny-flux", "tiny-pixart", "tiny-wan"} <= set(names)


def test_help_explains_commands() -> None:
    r = _run("--help")
    assert r.returncode == 0
    for word in ("generate", "report", "models", "TARGET"):
        assert word in r.stdout


def test_generate_writes_pngs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    prompts = tmp_path / "p.txt"
    prompts.write_text("# a comment\na green triangle at the top\n\n")
    code = main(
        [
            "generate",
            "shapes-unet",
            "--prompt",
            "a red circle on the left",
            "--prompts",
            str(prompts),
            "--steps",
            "2",
            "--out",
            str(tmp_path / "g"),
            "--no-progress",
        ]
    )
    assert code == 0
    pngs = sorted((tmp_path / "g").glob("*.png"))
    assert [p.name for p in pngs] == [
        "0000_a-red-circle-on-the-left.png",
        "0001_a-green-triangle-at-the-top.png",
    ]
    assert str(pngs[0]) in capsys.readouterr().out


def test_report_writes_json_and_self_contained_html(tmp_path: Path) -> None:
    out = tmp_path / "r"
    assert main(["report", "shapes-dit", "--eval-size", "2", "--steps", "2", "--out", str(out), "--no-progress"]) == 0
    data = json.loads((out / "report.json").read_text())
    assert data["target"] == "shapes-dit"
    for key in ("steps", "guidance", "seed", "scheduler"):
        assert key in data["settings"]
    q = data["quality"]
    for key in ("content_accuracy", "content_accuracy_heldout", "content_accuracy_pairs"):
        assert 0.0 <= q[key] <= 1.0
    assert q["n_prompts"] == 6
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 6
    assert "http" not in html.split("<pre>")[0]  # no external assets


def test_report_on_custom_prompts_judges_what_it_can(tmp_path: Path) -> None:
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle on the left\na photo of a cat\n")
    out = tmp_path / "r"
    assert (
        main(
            [
                "report",
                "shapes-unet",
                "--eval-prompts",
                str(prompts),
                "--steps",
                "2",
                "--out",
                str(out),
                "--no-progress",
            ]
        )
        == 0
    )
    q = json.loads((out / "report.json").read_text())["quality"]
    assert q["n_prompts"] == 1 and q["n_unjudged"] == 1


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["generate", "no-such-model", "--prompt", "x"], "valid built-in names: shapes-dit, shapes-unet"),
        (["report", "./missing/folder"], "folder not found"),
        (["generate", "shapes-unet"], "no prompts given"),
        (["generate", "shapes-unet", "--prompt", "x", "--steps", "0"], "must be a positive integer"),
        (["report", "shapes-unet", "--steps", "-3"], "must be a positive integer"),
        (["report", "shapes-unet", "--eval-size", "0"], "must be a positive integer"),
    ],
    ids=["unknown-model", "missing-folder", "no-prompts", "zero-steps", "negative-steps", "zero-eval-size"],
)
def test_bad_input_gives_one_clear_line_and_nonzero_exit(args: list[str], message: str) -> None:
    r = _run(*args)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    assert message in r.stderr


def test_empty_prompt_file_and_folder_without_index(tmp_path: Path) -> None:
    empty = tmp_path / "empty.txt"
    empty.write_text("# only a comment\n\n")
    r = _run("generate", "shapes-unet", "--prompts", str(empty))
    assert r.returncode == 2 and "holds no prompt" in r.stderr and "Traceback" not in r.stderr
    r = _run("generate", str(tmp_path), "--prompt", "x")
    assert r.returncode == 2 and "no model_index.json" in r.stderr and "Traceback" not in r.stderr


def test_a_wrong_target_is_answered_before_the_slow_imports(tmp_path: Path) -> None:
    """An unknown name, a missing folder, a folder that is no pipeline and one whose listed
    component is missing: each refused before diffusers is imported (about a second), and a
    random-weight built-in model is not built to check its name."""
    (tmp_path / "pipe").mkdir()
    index = {"_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"]}
    (tmp_path / "pipe" / "model_index.json").write_text(json.dumps(index))
    argvs = [["generate", "no-such-model", "--prompt", "x"], ["report", str(tmp_path / "missing")],
             ["optimize", str(tmp_path), "--out", str(tmp_path / "b")],
             ["generate", str(tmp_path / "pipe"), "--prompt", "x", "--out", str(tmp_path / "g")],
             ["generate", "tiny-flux", "--prompt", "x", "--out", str(tmp_path / "a_file")]]  # fmt: skip
    (tmp_path / "a_file").write_text("mine\n")
    code = (
        "import sys; from diffkiln.cli import main; "
        f"codes = [main(a) for a in {argvs!r}]; print(codes, 'diffusers' in sys.modules)"
    )
    env = {"DIFFKILN_CACHE": str(tmp_path / "cache"), "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, env=env)
    assert r.stdout.strip() == "[2, 2, 2, 2, 2] False", r.stdout + r.stderr
    for message in ("unknown model: 'no-such-model'", "folder not found", "has no model_index.json",
                    "lists the component 'unet' (UNet2DConditionModel) in model_index.json but has no"):  # fmt: skip
        assert message in r.stderr, r.stderr
    assert "a_file is an existing file" in r.stderr and not (tmp_path / "cache").exists()
