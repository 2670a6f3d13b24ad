"""ONNX export with integer GEMMs (``compute="integer"``): MatMulInteger / ConvInteger reproduce
the runtime's int32 arithmetic layer by layer, INT4 weights included."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

from diffkiln.export.onnx import OnnxCompute, OnnxExportConfig
from diffkiln.export.onnx.exporter import _finish
from diffkiln.export.onnx.modules import export_module_for
from diffkiln.export.onnx.ops import TRANSLATIONS
from diffkiln.report.metrics import sqnr_db
from tests.runtime.test_packed_layers import _layer


def _ort_run(model: onnx.ModelProto, x: torch.Tensor) -> np.ndarray:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]


def _export(stand_in: nn.Module, x: torch.Tensor, sub_byte: set[str]) -> onnx.ModelProto:
    import onnx_ir as ir

    program = torch.onnx.export(stand_in.eval(), (x,), dynamo=True, opset_version=21,
                                custom_translation_table=TRANSLATIONS, verbose=False)  # fmt: skip
    assert program is not None
    return ir.serde.serialize_model(_finish(program, sub_byte, 21))


@pytest.mark.parametrize("wbits", [8, 4], ids=["w8a8", "w4a8"])
@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_integer_gemm_reproduces_the_runtime_layer(kind: str, wbits: int) -> None:
    torch.manual_seed(0)
    if kind == "linear":
        module: nn.Module = nn.Linear(96, 48)
        x = torch.randn(2, 33, 96) * 3
    else:
        module = nn.Conv2d(16, 24, 3, padding=1)
        x = torch.randn(2, 16, 10, 10) * 3
    qmod, _ = _layer(module, x, wbits, 8, kind)
    with torch.no_grad():
        ref = qmod(x)
    key = "w_t" if kind == "linear" else "w"
    outs = {}
    for integer in (True, False):
        stand_in = export_module_for("layer", qmod, integer=integer)
        model = _export(stand_in, x, {key} if wbits <= 4 else set())
        ops = [n.op_type for n in model.graph.node]
        gemm = "MatMulInteger" if kind == "linear" else "ConvInteger"
        assert (gemm in ops) == integer and ("DequantizeLinear" in ops) != integer
        if integer and wbits <= 4:
            assert "Cast" in ops  # INT4 codes widen to int8 for the integer GEMM
            weight = next(i for i in model.graph.initializer if i.name == key)
            assert weight.data_type == onnx.TensorProto.INT4
        outs[integer] = _ort_run(model, x)
    # Integer sums are exact; the one float multiply and add are the runtime's (measured: equal
    # to the last bit). QDQ's float GEMM sums in another order (measured 60-80 dB).
    assert sqnr_db(ref.numpy(), outs[True]) >= 120.0
    assert sqnr_db(ref.numpy(), outs[True]) > sqnr_db(ref.numpy(), outs[False])


def test_compute_must_be_an_enum(tmp_path) -> None:
    with pytest.raises(ValueError, match="qdq, integer"):
        OnnxExportConfig(tmp_path, compute="integer")  # type: ignore[arg-type]
    assert OnnxExportConfig(tmp_path, compute=OnnxCompute.INTEGER).compute is OnnxCompute.INTEGER
