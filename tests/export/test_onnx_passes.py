"""The onnx-ir passes of the ONNX export, on small hand-built graphs."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from diffkiln.export.onnx.passes import (
    DropShapeInfoPass,
    Float16InitializersPass,
    ShortNodeNamesPass,
    StripNamePrefixPass,
    SubByteInitializersPass,
)


def _model(opset: int = 21, code_bits: int = 4) -> ir.Model:
    """y = (x @ W_exact + b_inexact) with W float32 values exact in float16, b not, plus a QDQ
    MatMul on int8 codes of ``code_bits`` bits."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((8, 4)).astype(np.float16).astype(np.float32)
    b = (rng.standard_normal(4) * np.float32(1 + 2**-20)).astype(np.float32)  # not exact in float16
    half = 2 ** (code_bits - 1)
    codes = rng.integers(-half, half, size=(8, 4)).astype(np.int8)
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "w"], ["h"]),
            helper.make_node("Add", ["h", "b"], ["h2"]),
            helper.make_node("DequantizeLinear", ["codes", "s"], ["wq"], axis=1),
            helper.make_node("MatMul", ["x", "wq"], ["h3"]),
            helper.make_node("Add", ["h2", "h3"], ["y"]),
        ],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])],
        [
            numpy_helper.from_array(w, "w"),
            numpy_helper.from_array(b * np.ones(4, np.float32), "b"),
            numpy_helper.from_array(codes, "codes"),
            numpy_helper.from_array(np.full(4, 0.1, np.float32), "s"),
        ],
        value_info=[helper.make_tensor_value_info("h", TensorProto.FLOAT, [2, 4])],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    return ir.serde.deserialize_model(proto)


def _run(model: ir.Model, x: np.ndarray) -> np.ndarray:
    proto = ir.serde.serialize_model(model)
    onnx.checker.check_model(proto, full_check=True)
    return ort.InferenceSession(proto.SerializeToString()).run(None, {"x": x})[0]


def test_float16_pass_converts_only_exact_values_and_keeps_the_result() -> None:
    x = np.random.default_rng(1).standard_normal((2, 8)).astype(np.float32)
    before = _run(_model(), x)
    model = _model()
    Float16InitializersPass(min_elements=4)(model)
    dtypes = {name: v.dtype for name, v in model.graph.initializers.items()}
    assert dtypes["w.f16"] == ir.DataType.FLOAT16 and "w" not in dtypes  # exact: stored as float16
    assert dtypes["b"] == ir.DataType.FLOAT  # not exact: untouched
    assert dtypes["s"] == ir.DataType.FLOAT  # 0.1 in float32 is not a float16 value
    np.testing.assert_array_equal(_run(model, x), before)  # bit-identical: only exact values moved


def test_float16_pass_keeps_small_tensors_whose_cast_would_cost_more() -> None:
    model = _model()
    w = model.graph.initializers.pop("w")
    w.name = "denoiser.down_blocks.0.attentions.0.proj_in.w_scale"  # 32 values: saves 64 bytes, costs ~150
    model.graph.register_initializer(w)
    Float16InitializersPass(min_elements=4)(model)
    assert model.graph.initializers[w.name].dtype == ir.DataType.FLOAT


def test_int4_pass_retypes_codes_and_rejects_what_does_not_fit() -> None:
    x = np.ones((2, 8), np.float32)
    before = _run(_model(), x)
    model = _model()
    SubByteInitializersPass({"codes"})(model)
    assert model.graph.initializers["codes"].dtype == ir.DataType.INT4
    np.testing.assert_array_equal(_run(model, x), before)
    with pytest.raises(ir.passes.PreconditionError, match="opset >= 21"):
        SubByteInitializersPass({"codes"})(_model(opset=20))
    with pytest.raises(ir.passes.PreconditionError, match="expected int8 codes"):
        SubByteInitializersPass({"w"})(_model())
    with pytest.raises(ir.passes.PreconditionError, match="no initializer named"):
        SubByteInitializersPass({"missing"})(_model())


@pytest.mark.parametrize(("opset", "code_bits", "dtype"), [
    (25, 2, ir.DataType.INT2), (21, 2, ir.DataType.INT4), (25, 3, ir.DataType.INT4), (25, 4, ir.DataType.INT4),
], ids=["int2-opset25", "2bit-opset21-int4", "3bit-int4", "4bit-int4"])  # fmt: skip
def test_sub_byte_pass_picks_the_narrowest_type_the_opset_has(opset: int, code_bits: int, dtype: ir.DataType) -> None:
    x = np.random.default_rng(2).standard_normal((2, 8)).astype(np.float32)
    before = _run(_model(opset, code_bits), x)
    model = _model(opset, code_bits)
    SubByteInitializersPass({"codes"})(model)
    assert model.graph.initializers["codes"].dtype == dtype
    proto = ir.serde.serialize_model(model)
    stored = next(i for i in proto.graph.initializer if i.name == "codes")
    assert len(stored.raw_data) == 32 * (2 if dtype == ir.DataType.INT2 else 4) // 8  # 32 codes, packed
    np.testing.assert_array_equal(_run(model, x), before)  # onnxruntime reads the narrow codes exactly


def test_clear_value_metadata_drops_torch_export_bookkeeping() -> None:
    from diffkiln.export.onnx.passes import ClearValueMetadataPass

    model = _model()
    model.graph.initializers["w"].metadata_props["pkg.torch.onnx.original_node_name"] = "p_w"
    model.graph.inputs[0].metadata_props["pkg.torch.export.graph_signature.InputSpec.kind"] = "USER_INPUT"
    ClearValueMetadataPass()(model)
    assert not model.graph.initializers["w"].metadata_props and not model.graph.inputs[0].metadata_props
    np.testing.assert_array_equal(_run(model, np.ones((2, 8), np.float32)), _run(_model(), np.ones((2, 8), np.float32)))


def test_drop_shape_info_keeps_graph_inputs_and_outputs() -> None:
    model = _model()
    DropShapeInfoPass()(model)
    proto = ir.serde.serialize_model(model)
    assert not proto.graph.value_info  # neither "h" nor the initializers (their tensors carry dtype and dims)
    assert proto.graph.output[0].type.tensor_type.elem_type == TensorProto.FLOAT
    np.testing.assert_array_equal(_run(model, np.ones((2, 8), np.float32)), _run(_model(), np.ones((2, 8), np.float32)))


def test_strip_prefix_renames_initializers_and_their_uses_but_never_onto_a_taken_name() -> None:
    x = np.random.default_rng(2).standard_normal((2, 8)).astype(np.float32)
    before = _run(_model(), x)
    model = _model()
    for old in ("w", "b", "codes"):
        model.graph.initializers[old].name = f"denoiser.{old}"
    model.graph.initializers["s"].name = "denoiser.x"  # stripped, it would be the graph input's name
    StripNamePrefixPass("denoiser.")(model)
    assert set(model.graph.initializers) == {"w", "b", "codes", "denoiser.x"}
    np.testing.assert_array_equal(_run(model, x), before)  # every use follows its initializer
    with pytest.raises(ValueError, match="ending with"):
        StripNamePrefixPass("denoiser")


def test_short_node_names_are_unique_and_change_nothing_computed() -> None:
    x = np.random.default_rng(3).standard_normal((2, 8)).astype(np.float32)
    model = _model()
    for i, node in enumerate(model.graph):
        node.name = f"node_{node.op_type}_{100 + i}"
    before_bytes = len(ir.serde.serialize_model(model).SerializeToString())
    before = _run(model, x)
    assert ShortNodeNamesPass()(model).modified
    assert [n.name for n in model.graph] == [f"n{i}" for i in range(len(model.graph))]
    np.testing.assert_array_equal(_run(model, x), before)
    assert len(ir.serde.serialize_model(model).SerializeToString()) < before_bytes
    assert not ShortNodeNamesPass()(model).modified  # idempotent
