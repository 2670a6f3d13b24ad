"""Bundle v1: export, verified loading, integer execution, and typed errors for bad bundles."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

from diffkiln.core.errors import BundleError
from diffkiln.core.metrics import sqnr_db
from diffkiln.export import ExportConfig, export_bundle
from diffkiln.nn import QConv2d, QLinear
from diffkiln.optimizer import SearchContext, W8A8Config
from diffkiln.runtime import load
from tests.runtime_e2e_helpers import PROMPTS, build_bundle, latents, quantize_in_memory


@pytest.fixture(scope="module")
def unet_bundle(random_shapes_pipelines, tmp_path_factory) -> tuple[Path, object]:
    out = tmp_path_factory.mktemp("bundles") / "unet-w8a8"
    return build_bundle(random_shapes_pipelines["unet"], W8A8Config(), out)


@pytest.mark.parametrize("arch", ["unet", "dit"])
def test_bundle_loads_without_fp_denoiser_and_matches_in_memory_quantization(
    arch: str, random_shapes_pipelines, tmp_path: Path
) -> None:
    pipe = random_shapes_pipelines[arch]
    bundle, plan = build_bundle(pipe, W8A8Config(), tmp_path / "b")
    loaded = load(bundle, device="cpu")
    assert type(loaded).__name__ == type(pipe).__name__
    den = loaded.unet if arch == "unet" else loaded.transformer
    qmods = [m for m in den.modules() if isinstance(m, (QLinear, QConv2d))]
    assert len(qmods) == sum(lp.quantized for lp in plan.layers)
    assert all(m.weight_t.dtype == torch.int8 for m in qmods)
    # Same integers as the in-memory path: the bundle round trip is exact.
    qpipe, _ = quantize_in_memory(pipe, W8A8Config())
    assert torch.equal(latents(loaded, PROMPTS[:2]), latents(qpipe, PROMPTS[:2]))
    assert sqnr_db(latents(pipe, PROMPTS[:2]), latents(loaded, PROMPTS[:2])) >= 10.0
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["sparsity"] == {} and manifest["cache"] == {}
    assert manifest["bos"]["positions"] == [0]


def test_int8_weights_are_stored_as_int8(unet_bundle) -> None:
    from safetensors import safe_open

    bundle, _ = unet_bundle
    manifest = json.loads((bundle / "manifest.json").read_text())
    with safe_open(str(bundle / manifest["quant"]["weights_file"]), "pt") as f:
        for name, info in manifest["quant"]["layers"].items():
            assert f.get_slice(f"{name}::weight_q").get_dtype() == "I8"
            assert info["bits"] == 8 and info["granularity"] == "per_channel" and info["symmetric"]


def test_existing_directory_needs_overwrite(unet_bundle, random_shapes_pipelines, tmp_path: Path) -> None:
    bundle, _ = unet_bundle
    with pytest.raises(BundleError, match="--overwrite"):
        build_bundle(random_shapes_pipelines["unet"], W8A8Config(), bundle)


def test_interrupted_export_leaves_nothing_that_loads(random_shapes_pipelines, tmp_path: Path, monkeypatch) -> None:
    from diffkiln.calibrate import CalibrationConfig, calibrate
    from diffkiln.core import atomic as atomic_mod
    from diffkiln.optimizer import make_plan

    pipe = random_shapes_pipelines["unet"]
    stats = calibrate(pipe, CalibrationConfig(PROMPTS[:1], steps=2, progress=False))
    plan = make_plan(pipe, stats, W8A8Config(), SearchContext(source_id="t"))

    def crash(*_a, **_k):
        raise KeyboardInterrupt

    monkeypatch.setattr(atomic_mod, "file_digest", crash)  # crash while listing the files
    out = tmp_path / "b"
    with pytest.raises(KeyboardInterrupt):
        export_bundle(pipe, plan, stats, ExportConfig(out))
    assert not out.exists() and list(tmp_path.iterdir()) == []


def _copy(bundle: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "copy"
    shutil.copytree(bundle, dst)
    return dst


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        ("tamper", "sha256"),
        ("truncate", "truncated"),
        ("future", "newer than this runtime"),
        ("garbage-manifest", "not valid JSON"),
        ("missing-file", "missing"),
        ("no-manifest", "no manifest.json"),
    ],
)
def test_bad_bundles_raise_bundle_error_with_the_reason(unet_bundle, tmp_path: Path, damage: str, message: str) -> None:
    b = _copy(unet_bundle[0], tmp_path)
    manifest = json.loads((b / "manifest.json").read_text())
    weights = b / manifest["quant"]["weights_file"]
    if damage == "tamper":
        data = bytearray(weights.read_bytes())
        data[-1] ^= 0xFF
        weights.write_bytes(bytes(data))
    elif damage == "truncate":
        weights.write_bytes(weights.read_bytes()[:-100])
    elif damage == "future":
        manifest["version"] = 99
        (b / "manifest.json").write_text(json.dumps(manifest))
    elif damage == "garbage-manifest":
        (b / "manifest.json").write_text("{not json")
    elif damage == "missing-file":
        weights.unlink()
    else:
        (b / "manifest.json").unlink()
    with pytest.raises(BundleError, match=message):
        load(b, device="cpu")


def test_runtime_imports_neither_calibrate_nor_optimizer() -> None:
    import subprocess

    code = (
        "import sys, diffkiln.runtime, diffkiln.kernels;"
        "bad=[m for m in sys.modules if m.startswith(('diffkiln.calibrate','diffkiln.optimizer','diffkiln.export'))];"
        "print(bad); sys.exit(1 if bad else 0)"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
