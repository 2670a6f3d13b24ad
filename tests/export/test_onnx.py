"""ONNX export of a bundle's denoiser: QDQ graph, int8 initializers, checked, run in onnxruntime."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from diffkiln.export.onnx import OnnxExportConfig, OnnxExportError, export_denoiser_onnx
from diffkiln.export.onnx.exporter import _record_inputs
from diffkiln.optimizer.plan import ActMode
from diffkiln.optimizer.planner import QuantizeConfig
from diffkiln.report.metrics import sqnr_db
from diffkiln.runtime import load
from tests.runtime_e2e_helpers import build_bundle


# One config keeps the suite short: 7-bit grids (a Clip before QuantizeLinear), SmoothQuant on
# every Linear (a Mul) and BOS rows (constants) cover every branch of the export modules.
@pytest.mark.parametrize("cfg_id", ["w8a7-smooth"])
def test_denoiser_onnx_matches_the_torch_runtime(shapes_pipelines, tmp_path: Path, cfg_id: str) -> None:
    from diffkiln.optimizer.planner import SmoothMode

    # The trained model: in a random-weight UNet, float rounding differences between ORT's and
    # torch's non-quantized ops flip activation codes and amplify (measured 22 dB there, 46 dB here).
    config = QuantizeConfig() if cfg_id == "w8a8" else QuantizeConfig(act_bits=7, smooth=SmoothMode.ALL)
    bundle, plan = build_bundle(shapes_pipelines["shapes-unet"], config, tmp_path / "b")
    path = export_denoiser_onnx(bundle, OnnxExportConfig(tmp_path / "onnx"))
    model = onnx.load(str(path))  # export already ran check_model(full_check=True)
    ops = [n.op_type for n in model.graph.node]
    n_quant = sum(lp.quantized for lp in plan.layers)
    # Layers reading the same input with the same grid (q, k, v) share one QuantizeLinear.
    assert 0 < ops.count("QuantizeLinear") <= n_quant
    int8 = {i.name for i in model.graph.initializer if i.data_type == onnx.TensorProto.INT8}
    assert sum(name.endswith((".w_t", ".w")) for name in int8) == n_quant  # every quantized weight is int8
    pipe = load(bundle, "cpu")
    example = _record_inputs(pipe, pipe.unet, "a red circle on the left")
    with torch.no_grad():
        ref = pipe.unet(**example, return_dict=False)[0].numpy()
    # Without graph optimizations ORT runs the QDQ graph as written: the same integers as torch.
    # (Its fused int8 kernels saturate u8 x s8 pair sums on AVX2 CPUs without VNNI, as oneDNN's
    # do; see docs/bundle-format.md.)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(str(path), options)
    out = session.run(None, {i.name: example[i.name].numpy() for i in session.get_inputs()})[0]
    assert out.shape == ref.shape and np.isfinite(out).all()
    assert sqnr_db(ref, out) >= 30.0, f"ONNX vs torch runtime: {sqnr_db(ref, out):.1f} dB"


def test_dynamic_activations_fail_naming_the_layer(random_shapes_pipelines, tmp_path: Path) -> None:
    bundle, _ = build_bundle(random_shapes_pipelines["unet"], QuantizeConfig(act_mode=ActMode.DYNAMIC), tmp_path / "b")
    with pytest.raises(OnnxExportError, match=r"down_blocks\..*dynamic per-token"):
        export_denoiser_onnx(bundle, OnnxExportConfig(tmp_path / "onnx"))


def test_bad_opset_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="opset"):
        OnnxExportConfig(tmp_path, opset=11)
