"""Export fixtures: one trained shapes-unet bundle and its ONNX export, built once per session."""

from __future__ import annotations

from pathlib import Path

import pytest

from diffkiln.api import convert
from diffkiln.export import FloatStorage
from diffkiln.optimizer import SmoothMode, W8A8Config
from tests.runtime_e2e_helpers import build_bundle


@pytest.fixture(scope="session")
def unet_bundle(shapes_pipelines, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """shapes-unet, W8A7 static with SmoothQuant on every Linear and BOS rows, float16 storage: 7-bit grids (a Clip
    before QuantizeLinear), smoothing (a Mul / ``div.mul_scale``) and BOS rows cover every branch
    of the exporters. The trained model: in a random-weight UNet, float rounding differences flip
    activation codes and amplify (measured 22 dB there, 46 dB here)."""
    config = W8A8Config(act_bits=7, smooth=SmoothMode.ALL)
    out = tmp_path_factory.mktemp("unet") / "b"
    # float16 storage, as an FP16 deployment stores its floats (the exports keep them float16).
    bundle, _ = build_bundle(shapes_pipelines["shapes-unet"], config, out, float_storage=FloatStorage.FLOAT16)
    return Path(bundle)


@pytest.fixture(scope="session")
def unet_onnx(unet_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The bundle exported to ONNX: every component, dynamic axes."""
    from diffkiln.export.onnx import OnnxExportConfig

    return convert(unet_bundle, OnnxExportConfig(tmp_path_factory.mktemp("onnx") / "o"))
