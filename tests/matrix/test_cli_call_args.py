"""The command line on folders of classes diffkiln does not know, with only call arguments."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from diffkiln.cli import main
from tests.matrix.builders import MATRIX, build


@pytest.fixture(scope="module")
def latte(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build("latte", tmp_path_factory.mktemp("latte") / "latte")


def _args(kwargs: dict[str, object]) -> list[str]:
    return [a for k, v in kwargs.items() for a in ("--call-arg", f"{k}={json.dumps(v)}")]


def test_optimize_inspect_and_generate_with_call_arguments(
    latte: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    kwargs = dict(MATRIX["latte"].call_kwargs)
    # Half from a JSON file, half on the command line (which wins where both give one).
    (tmp_path / "call.json").write_text(json.dumps({"height": 48, "clean_caption": False}))
    given = {k: v for k, v in kwargs.items() if k != "clean_caption"}
    out = tmp_path / "bundle"
    code = main(["optimize", str(latte), "--call-args", str(tmp_path / "call.json"), *_args(given), "--calib-size",
                 "2", "--steps", "2", "--out", str(out), "--no-progress"])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    recorded = json.loads((out / "manifest.json").read_text())["plan"]["notes"]["calibration"]["call_kwargs"]
    assert recorded == {**kwargs, "clean_caption": False}
    assert main(["inspect", str(out)]) == 0
    text = capsys.readouterr().out
    assert "proj_out: output projection: writes the denoiser's output" in text  # float, and why
    frames = tmp_path / "frames"
    code = main(["generate", str(out), "--prompt", "a red car", "--steps", "2", "--out", str(frames),
                 *_args(given), "--no-progress"])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    assert list(frames.glob("*.gif")) or list(frames.glob("*.png"))


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (["--call-arg", "num_frames"], "KEY=VALUE"),
        (["--call-arg", "no_such_argument=3"], "no_such_argument"),
        (["--call-args", "missing.json"], "does not exist"),
    ],
)
def test_bad_call_arguments_give_one_clear_line(
    extra: list[str], needle: str, latte: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    try:
        code = main(["optimize", str(latte), *extra, "--out", str(tmp_path / "b"), "--no-progress"])
    except SystemExit as exc:  # argparse's own usage errors
        code = exc.code
    err = capsys.readouterr().err
    assert code == 2 and needle in err and "Traceback" not in err
    assert not (tmp_path / "b").exists()
