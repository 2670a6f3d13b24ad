"""The training script runs end to end at toy scale (a few steps), so it cannot silently rot."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from diffusers import DiffusionPipeline

ROOT = Path(__file__).resolve().parents[2]


def test_train_script_toy_run_writes_loadable_pipelines(tmp_path: Path) -> None:
    work, out = tmp_path / "work", tmp_path / "out"
    cmd = [
        sys.executable,
        str(ROOT / "tools" / "train_shapes.py"),
        "--stage",
        "data,vae,unet,dit",
        "--work",
        str(work),
        "--out",
        str(out),
        "--device",
        "cpu",
        "--n-data",
        "64",
        "--workers",
        "1",
        "--vae-steps",
        "2",
        "--vae-batch",
        "4",
        "--steps",
        "2",
        "--batch",
        "4",
        "--eval-size",
        "1",
    ]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    vae_log = json.loads((work / "vae.json").read_text())
    assert 0.0 <= vae_log["judge_on_reconstructions"] <= 1.0 and vae_log["scaling_factor"] > 0
    for name, cls in (("shapes-unet", "StableDiffusionPipeline"), ("shapes-dit", "StableDiffusion3Pipeline")):
        pipe = DiffusionPipeline.from_pretrained(out / name, local_files_only=True)
        assert type(pipe).__name__ == cls
        assert set(json.loads((work / f"{name}.json").read_text())["quick_eval"]) == {
            "single",
            "single_heldout",
            "pairs",
        }
