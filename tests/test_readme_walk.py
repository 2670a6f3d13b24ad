"""A new user's walk through the README, in a temp folder: the commands of ``make demo`` (the
README's main command, read from the Makefile so that the two cannot drift apart), then the
README's next steps on the bundle it wrote (inspect, export to ONNX and MindIE-SD, generate from
the export), run as the CLI in subprocesses.

To fit CI the walk makes the runs small: ``--eval-size 2 --steps 4`` for reports and ``--steps 4``
for generation and calibration (appended, so they override the demo's own sizes). ``make demo``
itself runs at full size: README's time for it is measured, not asserted here.
"""

from __future__ import annotations

import os
import re
import shlex
import stat
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
_SMALL = {"report": ["--eval-size", "2", "--steps", "4"], "generate": ["--steps", "4"],
          "optimize": ["--calib-size", "4", "--steps", "4"]}  # fmt: skip


def demo_commands(demo: Path) -> list[list[str]]:
    """The ``diffkiln`` commands of the Makefile's ``demo`` target, with ``$(DEMO)`` at ``demo``."""
    text = (ROOT / "Makefile").read_text().replace("\\\n", " ")
    recipe = re.search(r"^demo:.*?\n((?:\t.*\n)+)", text, re.MULTILINE)
    assert recipe, "the Makefile has no demo target"
    commands = []
    for line in recipe.group(1).splitlines():
        words = shlex.split(line.strip().lstrip("@"))
        if words and words[0] == "$(BIN)/diffkiln":
            commands.append([w.replace("$(DEMO)", str(demo)) for w in words[1:]])
    return commands


def _cli(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "diffkiln", *args], capture_output=True, text=True, cwd=cwd,
                          env=env, timeout=900)  # fmt: skip


def _ok(r: subprocess.CompletedProcess[str]) -> str:
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert not [line for line in r.stderr.splitlines() if "Warning" in line], r.stderr[-3000:]
    return r.stdout


@pytest.fixture(scope="module")
def walked(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo's commands, run in order in a fresh folder; returns the folder."""
    home = tmp_path_factory.mktemp("new-user")
    commands = demo_commands(home / "out" / "demo")
    assert [c[0] for c in commands] == ["models", "generate", "report", "optimize", "report"]
    for args in commands:
        _ok(_cli([*args, *_SMALL.get(args[0], [])], home))
    return home


def test_the_demo_writes_what_the_readme_promises(walked: Path) -> None:
    demo = walked / "out" / "demo"
    readme = (ROOT / "README.md").read_text()
    for promised in ("out/demo/images/*.png", "out/demo/report-shapes-unet/report.{json,html}",
                     "out/demo/shapes-unet-w8a8/", "out/demo/report-shapes-unet-w8a8/"):  # fmt: skip
        assert promised in readme
    assert len(list((demo / "images").glob("*.png"))) == 2
    for report in ("report-shapes-unet", "report-shapes-unet-w8a8"):
        assert (demo / report / "report.json").is_file() and (demo / report / "report.html").is_file()
    assert (demo / "shapes-unet-w8a8" / "manifest.json").is_file()
    text = (demo / "report-shapes-unet-w8a8" / "report.json").read_text()
    assert '"bos_comparison"' in text and '"latent_sqnr_db"' in text
    for path in demo.rglob("*"):  # another user or service can read everything the demo wrote
        mode = stat.S_IMODE(path.stat().st_mode)
        assert mode & 0o044 == 0o044 if path.is_file() else mode & 0o055 == 0o055, (path, oct(mode))


def test_the_readme_next_steps_on_the_bundle(walked: Path) -> None:
    bundle = "out/demo/shapes-unet-w8a8"
    assert "layers   W8A8:" in _ok(_cli(["inspect", bundle], walked))
    _ok(_cli(["export", bundle, "--format", "mindiesd", "--out", "out/mindiesd"], walked))
    assert (walked / "out" / "mindiesd" / "quant_model_weight_w8a8.safetensors").is_file()
    _ok(_cli(["export", bundle, "--format", "onnx", "--denoiser-only", "--out", "out/onnx-denoiser"], walked))
    assert (walked / "out" / "onnx-denoiser" / "denoiser.onnx").is_file()
    # Running the same command again is refused, naming --overwrite; with it, the export is replaced.
    again = _cli(["export", bundle, "--format", "mindiesd", "--out", "out/mindiesd"], walked)
    assert again.returncode == 2 and "pass --overwrite" in again.stderr
    _ok(_cli(["export", bundle, "--format", "mindiesd", "--out", "out/mindiesd", "--overwrite"], walked))
