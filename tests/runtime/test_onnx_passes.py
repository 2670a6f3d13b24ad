"""Passes the onnxruntime backend applies before building a session: they change how onnxruntime runs
a graph, never what it computes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from diffkiln.runtime.onnx_passes import FoldConvWeightDequantizePass
from diffkiln.runtime.onnxruntime_backend import open_session

RNG = np.random.default_rng(0)


def _qdq_conv_model(scale_via_cast: bool, zero_point: bool, weight_from_input: bool = False) -> onnx.ModelProto:
    """x -> Q -> DQ -> Conv(DQ(int8 weight)) -> y, the shape of a diffkiln W8A8 convolution."""
    weight = RNG.integers(-127, 128, size=(8, 4, 3, 3)).astype(np.int8)
    scale = (RNG.random(8) * 0.02 + 0.001).astype(np.float16).astype(np.float32)
    inits = [
        numpy_helper.from_array(np.array(0.05, np.float32), "x_scale"),
        numpy_helper.from_array(np.array(0, np.int8), "x_zero"),
        numpy_helper.from_array(RNG.standard_normal(8).astype(np.float32), "bias"),
    ]
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "x_scale", "x_zero"], ["xq"]),
        helper.make_node("DequantizeLinear", ["xq", "x_scale", "x_zero"], ["xd"]),
    ]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 6, 6])]
    if weight_from_input:
        inputs.append(helper.make_tensor_value_info("w_q", TensorProto.INT8, [8, 4, 3, 3]))
    else:
        inits.append(numpy_helper.from_array(weight, "w_q"))
    if scale_via_cast:
        inits.append(numpy_helper.from_array(scale.astype(np.float16), "w_scale.f16"))
        nodes.insert(0, helper.make_node("Cast", ["w_scale.f16"], ["w_scale"], to=TensorProto.FLOAT))
    else:
        inits.append(numpy_helper.from_array(scale, "w_scale"))
    dq_inputs = ["w_q", "w_scale"]
    if zero_point:
        inits.append(numpy_helper.from_array(np.zeros(8, np.int8), "w_zero"))
        dq_inputs.append("w_zero")
    nodes += [
        helper.make_node("DequantizeLinear", dq_inputs, ["w"], axis=0),
        helper.make_node("Conv", ["xd", "w", "bias"], ["y"], pads=[1, 1, 1, 1]),
    ]
    graph = helper.make_graph(nodes, "qdq_conv", inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              inits)  # fmt: skip
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])


def _run(model: onnx.ModelProto | bytes, feeds: dict[str, np.ndarray]) -> np.ndarray:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # compare values, not fusions
    data = model if isinstance(model, bytes) else model.SerializeToString()
    return ort.InferenceSession(data, options, providers=["CPUExecutionProvider"]).run(None, feeds)[0]


@pytest.mark.parametrize("scale_via_cast", [False, True], ids=["f32-scale", "f16-scale-cast"])
@pytest.mark.parametrize("zero_point", [False, True], ids=["no-zp", "zp"])
def test_fold_is_bit_exact_and_removes_weight_dequantize(scale_via_cast, zero_point):
    proto = _qdq_conv_model(scale_via_cast, zero_point)
    feeds = {"x": RNG.standard_normal((1, 4, 6, 6)).astype(np.float32)}
    before = _run(proto, feeds)
    model = ir.from_proto(proto)
    result = FoldConvWeightDequantizePass()(model)
    assert result.modified
    ops = [n.op_type for n in model.graph]
    assert ops.count("DequantizeLinear") == 1 and "Cast" not in ops  # the activation's DQ stays
    assert (
        "w_q" not in model.graph.initializers and model.graph.initializers["w.dequantized"].dtype == ir.DataType.FLOAT
    )
    after = _run(ir.to_proto(model).SerializeToString(), feeds)
    # DequantizeLinear's own arithmetic, done once: the convolution sees the same float32 weights.
    np.testing.assert_array_equal(before, after)


def test_weight_that_is_not_constant_is_left_alone():
    model = ir.from_proto(_qdq_conv_model(False, False, weight_from_input=True))
    assert not FoldConvWeightDequantizePass()(model).modified
    assert [n.op_type for n in model.graph].count("DequantizeLinear") == 2


def _requantize_output(proto: onnx.ModelProto) -> onnx.ModelProto:
    """The same graph with the convolution's output requantized: y -> Q -> DQ (as
    ``W8A8Config.requantize_conv_outputs`` exports it)."""
    graph = proto.graph
    graph.node[-1].output[0] = "y_float"
    graph.initializer.extend([numpy_helper.from_array(np.array(0.1, np.float32), "y_scale"),
                              numpy_helper.from_array(np.array(0, np.int8), "y_zero")])  # fmt: skip
    graph.node.extend([helper.make_node("QuantizeLinear", ["y_float", "y_scale", "y_zero"], ["yq"]),
                       helper.make_node("DequantizeLinear", ["yq", "y_scale", "y_zero"], ["y"])])  # fmt: skip
    return proto


def test_requantized_convolution_is_left_for_onnxruntimes_qlinearconv(tmp_path):
    proto = _requantize_output(_qdq_conv_model(False, False))
    model = ir.from_proto(proto)
    # A float weight would stop onnxruntime fusing DQ -> Conv -> Q into an integer QLinearConv.
    assert not FoldConvWeightDequantizePass()(model).modified
    path = tmp_path / "m.onnx"
    onnx.save(proto, path)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    session = open_session(path, options, ["CPUExecutionProvider"], fold_conv_weights=True)
    feeds = {"x": RNG.standard_normal((1, 4, 6, 6)).astype(np.float32)}
    fused = session.run(None, feeds)[0]
    ops = [n.op_type for n in onnx.load(tmp_path / "optimized.onnx").graph.node]
    assert "QLinearConv" in ops and "Conv" not in ops, ops
    reference = _run(proto, feeds)  # QDQ as written: float convolution, then the output grid
    # Same grid; the integer convolution's own rounding may move a value by one step of 0.1.
    assert float(np.abs(fused - reference).max()) <= 0.1 + 1e-6


def test_open_session_folds_and_matches(tmp_path):
    proto = _qdq_conv_model(True, False)
    path = tmp_path / "m.onnx"
    onnx.save(proto, path)
    feeds = {"x": RNG.standard_normal((1, 4, 6, 6)).astype(np.float32)}
    options = ort.SessionOptions()
    options.log_severity_level = 3
    plain = open_session(path, options, ["CPUExecutionProvider"]).run(None, feeds)[0]
    folded_session = open_session(path, options, ["CPUExecutionProvider"], fold_conv_weights=True)
    folded = folded_session.run(None, feeds)[0]
    # Optimized sessions: the folded convolution may take another float kernel (NCHWc), so compare
    # as float results of one graph, not bits.
    err = float(np.abs(plain - folded).max())
    assert err <= 1e-4 * float(np.abs(plain).max()), err
    assert path.read_bytes() == proto.SerializeToString()  # the file on disk is untouched


def test_open_session_folds_a_large_graph_through_a_temporary_file(tmp_path, monkeypatch):
    # Above protobuf's 2 GB (here: any size) the folded graph goes through a file with external
    # data that lives as long as the session.
    import diffkiln.runtime.onnxruntime_session as backend

    monkeypatch.setattr(backend, "_PROTOBUF_BYTES", 0)
    proto = _qdq_conv_model(True, True)
    path = tmp_path / "m.onnx"
    onnx.save(proto, path)
    feeds = {"x": RNG.standard_normal((1, 4, 6, 6)).astype(np.float32)}
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = open_session(path, options, ["CPUExecutionProvider"], fold_conv_weights=True)
    folder = session.diffkiln_folded_files
    assert folder is not None and any(p.suffix == ".data" for p in Path(folder.name).iterdir())
    np.testing.assert_array_equal(session.run(None, feeds)[0], _run(proto, feeds))
