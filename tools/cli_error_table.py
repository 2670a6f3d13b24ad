"""Run every refused CLI input a user can give and write docs/cli-errors.md: the command, the exit
status and the one line the CLI prints. A case that prints a traceback, or exits 0, is reported
and makes the tool exit 1.

    python tools/cli_error_table.py [--out docs/cli-errors.md]

It builds what the cases need in a temp folder (a bundle of shapes-unet, a copy of its FP folder,
prompt files), through the CLI itself.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

# (what the user did, argv with {b} bundle, {f} user folder, {t} temp folder)
CASES: list[tuple[str, list[str]]] = [
    ("unknown built-in model", ["generate", "no-such-model", "--prompt", "x"]),
    ("a folder that does not exist", ["report", "./missing/folder"]),
    ("a folder without model_index.json", ["generate", "{t}/empty", "--prompt", "x"]),
    ("a file as the model", ["generate", "{t}/a_file", "--prompt", "x"]),
    ("no prompts", ["generate", "shapes-unet"]),
    ("a prompts file that does not exist", ["generate", "shapes-unet", "--prompts", "{t}/nope.txt"]),
    ("a prompts file with no prompt", ["generate", "shapes-unet", "--prompts", "{t}/comments.txt"]),
    ("zero steps", ["generate", "shapes-unet", "--prompt", "x", "--steps", "0"]),
    ("negative guidance", ["generate", "shapes-unet", "--prompt", "x", "--guidance", "-1"]),
    ("zero evaluation prompts", ["report", "shapes-unet", "--eval-size", "0"]),
    ("a malformed --call-arg", ["generate", "shapes-unet", "--prompt", "x", "--call-arg", "height"]),
    ("a --call-arg the pipeline does not take", ["generate", "shapes-dit", "--prompt", "x", "--call-arg", "fps=3"]),
    (
        "a call argument the pipeline's own checks refuse",
        ["generate", "shapes-unet", "--prompt", "x", "--call-arg", "height=7", "--call-arg", "width=7"],
    ),
    (
        "--image for a pipeline that starts from none",
        ["generate", "shapes-unet", "--prompt", "x", "--image", "{t}/a_file"],
    ),
    (
        "--video for a pipeline that starts from no clip",
        ["generate", "shapes-unet", "--prompt", "x", "--video", "{t}/a_file"],
    ),
    (
        "--calib-image for a pipeline that starts from none",
        ["optimize", "shapes-unet", "--calib-image", "{t}/a_file", "--out", "{t}/ci"],
    ),
    ("--out is an existing file (generate)", ["generate", "{b}", "--prompt", "x", "--out", "{t}/a_file"]),
    ("--out is an existing file (report)", ["report", "{b}", "--out", "{t}/a_file"]),
    ("--out is an existing file (sensitivity)", ["sensitivity", "shapes-unet", "--out", "{t}/a_file"]),
    ("--device cuda on a CPU-only torch", ["generate", "{b}", "--prompt", "x", "--device", "cuda"]),
    ("an unknown device", ["generate", "{b}", "--prompt", "x", "--device", "tpu"]),
    ("--device npu without torch_npu", ["generate", "{b}", "--prompt", "x", "--device", "npu"]),
    ("--threads 0", ["--threads", "0", "inspect", "{b}"]),
    (
        "--overwrite onto a folder of the user's own files",
        ["optimize", "shapes-unet", "--out", "{t}/thesis", "--overwrite"],
    ),
    ("--out onto an existing bundle without --overwrite", ["optimize", "shapes-unet", "--out", "{b}"]),
    ("--out onto an existing file (export)", ["export", "{b}", "--format", "mindiesd", "--out", "{t}/a_file"]),
    (
        "an option of another recipe",
        ["optimize", "shapes-unet", "--recipe", "mixed", "--weight-bits", "4", "--out", "{t}/m"],
    ),
    (
        "a budget out of range",
        ["optimize", "shapes-unet", "--recipe", "mixed", "--avg-weight-bits", "1", "--out", "{t}/m"],
    ),
    (
        "an infeasible budget (refused before the search)",
        [
            "optimize",
            "shapes-unet",
            "--recipe",
            "mixed",
            "--avg-weight-bits",
            "2",
            "--calib-size",
            "2",
            "--steps",
            "2",
            "--out",
            "{t}/m",
            "--no-progress",
        ],
    ),
    ("--cache-budget above 1", ["optimize", "shapes-dit", "--cache-budget", "1.5", "--out", "{t}/c"]),
    (
        "--cache-budget with --cache-speedup",
        ["optimize", "shapes-dit", "--cache-budget", "0.5", "--cache-speedup", "2", "--out", "{t}/c"],
    ),
    (
        "calibration prompts file missing",
        ["optimize", "shapes-unet", "--calib-prompts", "{t}/nope.txt", "--out", "{t}/c"],
    ),
    ("a user's folder with truncated weights", ["generate", "{t}/truncated", "--prompt", "x"]),
    ("a user's folder without its tokenizer", ["generate", "{t}/no-tokenizer", "--prompt", "x"]),
    ("report on a user's folder without prompts", ["report", "{f}"]),
    ("report against another model's weights", ["report", "{b}", "--baseline", "{t}/retrained", "--eval-size", "1"]),
    ("report against another architecture", ["report", "{b}", "--baseline", "tiny-sd3", "--eval-size", "1"]),
    ("--fail-on-regression file missing", ["report", "{b}", "--fail-on-regression", "{t}/nope.json"]),
    ("a bundle whose manifest was deleted", ["generate", "{t}/no-manifest", "--prompt", "x"]),
    ("inspect a bundle whose manifest was deleted", ["inspect", "{t}/no-manifest"]),
    ("inspect a file", ["inspect", "{t}/a_file"]),
    ("a bundle with a truncated weights file", ["inspect", "{t}/truncated-bundle"]),
    ("a bundle with an unlisted file", ["inspect", "{t}/extra-file-bundle"]),
    ("export to an opset outside 19..25", ["export", "{b}", "--format", "onnx", "--opset", "99", "--out", "{t}/o"]),
    ("an unknown export format", ["export", "{b}", "--format", "tensorrt", "--out", "{t}/o"]),
    ("export a folder that is not a bundle", ["export", "{f}", "--format", "onnx", "--out", "{t}/o"]),
]


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "diffkiln", *args], capture_output=True, text=True, cwd=cwd,
                          env=env, timeout=900)  # fmt: skip


def _prepare(t: Path) -> tuple[Path, Path]:
    """Build the files the cases refer to; returns (bundle, the user's FP folder)."""
    from diffkiln.zoo.registry import resolve_target

    (t / "empty").mkdir()
    (t / "a_file").write_text("mine\n")
    (t / "comments.txt").write_text("# only a comment\n\n")
    (t / "thesis").mkdir()
    (t / "thesis" / "thesis.txt").write_text("four years of work\n")
    folder = t / "my-model"
    shutil.copytree(resolve_target("shapes-unet").path, folder)
    bundle = t / "bundle"
    r = _cli("optimize", str(folder), "--calib-size", "2", "--steps", "2", "--out", str(bundle), "--no-progress", cwd=t)
    if r.returncode:
        raise SystemExit(f"cannot build the bundle the cases need:\n{r.stderr}")
    for name, damage in (("truncated", "weights"), ("no-tokenizer", "tokenizer"), ("retrained", "retrain")):
        shutil.copytree(folder, t / name)
        weights = t / name / "unet" / "diffusion_pytorch_model.safetensors"
        if damage == "weights":
            weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
        elif damage == "tokenizer":
            shutil.rmtree(t / name / "tokenizer")
        else:  # the same architecture with other weights: one byte of the payload changed
            data = bytearray(weights.read_bytes())
            data[-3] ^= 0x01
            weights.write_bytes(bytes(data))
    for name in ("no-manifest", "truncated-bundle", "extra-file-bundle"):
        shutil.copytree(bundle, t / name)
    (t / "no-manifest" / "manifest.json").unlink()
    quant = next((t / "truncated-bundle").rglob("*.safetensors"))
    quant.write_bytes(quant.read_bytes()[:100])
    (t / "extra-file-bundle" / "run.py").write_text("print('hello')\n")
    return bundle, folder


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("docs/cli-errors.md"))
    a = ap.parse_args()
    rows, bad = [], []
    with tempfile.TemporaryDirectory(prefix="diffkiln-cli-errors-") as tmp:
        t = Path(tmp)
        bundle, folder = _prepare(t)
        for what, argv in CASES:
            args = [x.format(b=bundle, f=folder, t=t) for x in argv]
            r = _cli(*args, cwd=t)
            lines = [x for x in r.stderr.splitlines() if re.match(r"(diffkiln[\w -]*: )?error: ", x)]
            message = lines[-1] if lines else "(none)"
            if "Traceback" in r.stderr or r.returncode == 0 or len(lines) != 1:
                bad.append(f"{what}: status {r.returncode}\n{r.stderr[-2000:]}")
            shown = " ".join(x.format(b="BUNDLE", f="./my-model", t=".") for x in argv)
            shown = shown.replace("./", "") if "{t}" in " ".join(argv) else shown
            rows.append(
                f"| {what} | `diffkiln {shown}` | {r.returncode} | {message.replace(tmp, '.').replace('|', '/')} |"
            )
            print(f"{r.returncode}  {what}: {message[:140]}", flush=True)
    a.out.write_text(
        "# What the CLI refuses, and what it says\n\n"
        "Every refused input prints one `error:` line that names the problem and the fix, without a "
        "traceback, and writes nothing. Exit status 2: a usage error (an argument or a path the user "
        "gave); 1: a failure (a bundle or folder that fails its checks). Generated by "
        "`python tools/cli_error_table.py`, which runs each command against a bundle of shapes-unet "
        "(`BUNDLE`) and a copy of its folder (`my-model`); `tests/test_cli_first_hour.py` asserts the "
        "cases in a subprocess.\n\n"
        "| the user | command | status | message |\n|---|---|---|---|\n" + "\n".join(rows) + "\n"
    )
    for b in bad:
        print(f"NOT CLEAN: {b}", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
