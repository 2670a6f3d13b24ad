"""MindIE-SD / msModelSlim export: the files, their description, and an independent loader
(tests/export/mindiesd_loader.py, written from the format's formulas) reproducing the bundle."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from diffkiln.api import convert
from diffkiln.core.hooks import recording_calls
from diffkiln.core.metrics import sqnr_db
from diffkiln.core.plan import ActMode
from diffkiln.export import FloatStorage
from diffkiln.export.mindiesd import MindieExportConfig, MindieExportError, MindieFloat
from diffkiln.optimizer import SearchContext, SmoothMode, W8A8Config
from diffkiln.runtime import load
from tests.export.mindiesd_loader import load_mindiesd
from tests.runtime_e2e_helpers import build_bundle


def _per_call_sqnr(bundle: Path, model: torch.nn.Module, steps: int = 8) -> list[float]:
    pipe = load(bundle, "cpu")
    pipe.set_progress_bar_config(disable=True)
    with recording_calls("test", pipe.unet) as calls, torch.no_grad():
        pipe("a red circle on the left", num_inference_steps=steps, generator=torch.Generator().manual_seed(0),
             output_type="latent")  # fmt: skip
    out = []
    for args, kwargs in calls:
        with torch.no_grad():
            out.append(sqnr_db(pipe.unet(*args, **kwargs)[0].numpy(), model(*args, **kwargs)[0].numpy()))
    return out


@pytest.fixture(scope="module")
def w8a8_smooth_bundle(shapes_pipelines, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """shapes-unet W8A8 static, SmoothQuant on every Linear, BOS rows, float16 storage."""
    config = W8A8Config(smooth=SmoothMode.ALL)
    out = tmp_path_factory.mktemp("md-bundle") / "b"
    bundle, _ = build_bundle(shapes_pipelines["shapes-unet"], config, out, float_storage=FloatStorage.FLOAT16)
    return Path(bundle)


def test_seven_bit_grids_are_listed_as_widened(unet_bundle: Path, tmp_path: Path) -> None:
    out = convert(unet_bundle, MindieExportConfig(tmp_path / "md"))
    meta = json.loads((out / "diffkiln_export.json").read_text())
    layers = json.loads((unet_bundle / "manifest.json").read_text())["quant"]["layers"]
    assert set(meta["widened"]) == set(layers) and all("7-bit" in v for v in meta["widened"].values())


@pytest.mark.parametrize("dtype", [MindieFloat.FLOAT16, MindieFloat.BFLOAT16], ids=["float16", "bfloat16"])
def test_static_w8a8_files_reproduce_the_bundle(w8a8_smooth_bundle: Path, tmp_path: Path, dtype: MindieFloat) -> None:
    unet_bundle = w8a8_smooth_bundle
    out = convert(unet_bundle, MindieExportConfig(tmp_path / "md", dtype=dtype))
    description = json.loads((out / "quant_model_description_w8a8.json").read_text())
    tensors = load_file(str(out / "quant_model_weight_w8a8.safetensors"))
    assert description["model_quant_type"] == "W8A8"
    assert set(description) - {"model_quant_type"} == set(tensors)  # every tensor is described
    layers = json.loads((unet_bundle / "manifest.json").read_text())["quant"]["layers"]
    for name in layers:
        assert tensors[f"{name}.weight"].dtype == torch.int8
        assert tensors[f"{name}.quant_bias"].dtype == torch.int32
        assert tensors[f"{name}.deq_scale"].dtype == torch.float32
        assert tensors[f"{name}.input_scale"].dtype == getattr(torch, dtype.value)
        assert tensors[f"{name}.input_scale"].shape == (1,)
        assert description[f"{name}.weight"] == "W8A8"
    assert any(k.endswith(".div.mul_scale") for k in tensors)  # SmoothQuant factors
    assert description["conv_in.weight"] == "FLOAT"
    assert not json.loads((out / "diffkiln_export.json").read_text())["widened"]
    # The independent loader reproduces the bundle's denoiser call by call. The format's float16 /
    # bfloat16 input scales move each grid step slightly, which flips a few codes; measured on the
    # 2026-12-01 shapes-unet over 8 steps: 42.7 falling to 27.2 dB at the last (low-noise) step
    # (float16), 42.1 to 26.5 dB (bfloat16), medians 36.2 / 35.3 dB. A wrong formula or layout
    # measures below 10 dB.
    values = _per_call_sqnr(unet_bundle, load_mindiesd(out))
    assert min(values) >= 24.0 and float(np.median(values)) >= 32.0, values


def test_dynamic_bundle_writes_the_dynamic_variant(shapes_pipelines, tmp_path: Path) -> None:
    config = W8A8Config(act_mode=ActMode.DYNAMIC)
    pipe = shapes_pipelines["shapes-unet"]
    bundle, _ = build_bundle(pipe, config, tmp_path / "b", float_storage=FloatStorage.FLOAT16)
    out = convert(bundle, MindieExportConfig(tmp_path / "md"))
    description = json.loads((out / "quant_model_description_w8a8_dynamic.json").read_text())
    tensors = load_file(str(out / "quant_model_weight_w8a8_dynamic.safetensors"))
    assert description["model_quant_type"] == "W8A8_DYNAMIC"
    name = "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k"
    assert {f"{name}.weight", f"{name}.weight_scale", f"{name}.weight_offset"} <= set(tensors)
    assert not tensors[f"{name}.weight_offset"].any()  # symmetric weights
    assert min(_per_call_sqnr(Path(bundle), load_mindiesd(out), steps=4)) >= 30.0


def test_timestep_aware_layers_fail_or_stay_float(shapes_pipelines, tmp_path: Path) -> None:
    from diffkiln.calibrate import CalibrationConfig, calibrate
    from diffkiln.export import ExportConfig, export_bundle
    from diffkiln.optimizer import make_plan
    from tests.runtime_e2e_helpers import CACHE, PROMPTS

    pipe = shapes_pipelines["shapes-unet"]
    stats = calibrate(pipe, CalibrationConfig(PROMPTS, steps=4, batch_size=4, cache_dir=CACHE, progress=False))
    plan = make_plan(pipe, stats, W8A8Config(timestep_aware=True), SearchContext(source_id="t"))
    bundle = export_bundle(pipe, plan, stats, ExportConfig(tmp_path / "b"))
    with pytest.raises(MindieExportError, match=r"\w+\.\w+.*timestep-aware.*--keep-fp"):
        convert(bundle, MindieExportConfig(tmp_path / "md"))
    assert not (tmp_path / "md").exists()
    out = convert(bundle, MindieExportConfig(tmp_path / "md", keep_fp=True))
    meta = json.loads((out / "diffkiln_export.json").read_text())
    assert meta["kept_fp"] and len(meta["kept_fp"]) == sum(lp.quantized for lp in plan.layers)
    description = json.loads((out / "quant_model_description_w8a8.json").read_text())
    assert all(description[f"{n}.weight"] == "FLOAT" for n in meta["kept_fp"])
    # FLOAT layers hold the dequantized weights: the loader's float model tracks the bundle.
    assert min(_per_call_sqnr(Path(bundle), load_mindiesd(out), steps=4)) >= 20.0


def test_bad_dtype_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="dtype must be one of"):
        dataclasses.replace(MindieExportConfig(tmp_path), dtype="float64")  # type: ignore[arg-type]


def test_export_command_writes_mindiesd_and_refuses_to_overwrite(
    unet_bundle: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from diffkiln.cli import main

    argv = ["export", str(unet_bundle), "--format", "mindiesd", "--out", str(tmp_path / "md")]
    assert main(argv) == 0
    assert "quant_model_weight_w8a8.safetensors" in capsys.readouterr().out
    assert main(argv) == 2
    assert "already exists; pass --overwrite" in capsys.readouterr().err
    assert main([*argv, "--overwrite", "--dtype", "bfloat16"]) == 0
