"""Store sub-byte weight codes (4-, 3- and 2-bit layers) as INT4 or INT2 initializers."""

from __future__ import annotations

from collections.abc import Iterable

import onnx_ir as ir

__all__ = ["INT2_MIN_OPSET", "SubByteInitializersPass"]

INT2_MIN_OPSET = 25
"""ONNX added INT2 (DequantizeLinear, Cast) in opset 25; onnxruntime 1.32 runs both (measured)."""

_INTEGER_GEMMS = frozenset({"MatMulInteger", "ConvInteger"})
_SUB_BYTE = frozenset({ir.DataType.INT4, ir.DataType.INT2})


def _sub_byte_into_integer_gemm(model: ir.Model) -> list[str]:
    return [
        node.name or node.op_type
        for node in model.graph
        if node.op_type in _INTEGER_GEMMS and any(v is not None and v.dtype in _SUB_BYTE for v in node.inputs)
    ]


class SubByteInitializersPass(ir.passes.InPlacePass):
    """Retype the named int8 initializers as the narrowest integer type their codes fit (opset >= 21).

    Codes in [-2, 1] (2-bit layers) become INT2, four per byte, at opset >= 25; every other named
    initializer, and 2-bit codes at opsets 21-24, become INT4 (codes in [-8, 7], two per byte; 3-bit
    codes too: ONNX has no 3-bit type). ``MatMulInteger`` and ``ConvInteger`` take 8-bit inputs
    only, so a sub-byte weight they read goes through a ``Cast`` to INT8 (onnxruntime folds it once
    at load; the file keeps the narrow codes).

    Args:
        names: the initializers to retype: the weight codes of the layers below 8 bits.
    """

    def __init__(self, names: Iterable[str]):
        super().__init__()
        self.names = frozenset(names)

    def requires(self, model: ir.Model) -> None:
        if model.opset_imports.get("", 0) < 21:
            raise ir.passes.PreconditionError("INT4 initializers need opset >= 21")
        missing = self.names - set(model.graph.initializers)
        if missing:
            raise ir.passes.PreconditionError(f"no initializer named {sorted(missing)[:3]}")
        for name in self.names:
            value = model.graph.initializers[name]
            if value.dtype != ir.DataType.INT8 or value.const_value is None:
                raise ir.passes.PreconditionError(f"{name}: expected int8 codes, got {value.dtype}")
            codes = value.const_value.numpy()
            if codes.size and (codes.min() < -8 or codes.max() > 7):
                raise ir.passes.PreconditionError(f"{name}: codes outside int4 ([{codes.min()}, {codes.max()}])")

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        import ml_dtypes

        int2_ok = model.opset_imports.get("", 0) >= INT2_MIN_OPSET
        for name in self.names:
            value = model.graph.initializers[name]
            assert value.const_value is not None  # checked in requires
            codes = value.const_value.numpy()
            two_bit = int2_ok and (codes.size == 0 or (codes.min() >= -2 and codes.max() <= 1))
            narrow, dtype = (ml_dtypes.int2, ir.DataType.INT2) if two_bit else (ml_dtypes.int4, ir.DataType.INT4)
            value.const_value = ir.Tensor(codes.astype(narrow), name=name)
            value.dtype = dtype
            gemms = [(node, i) for node, i in value.uses() if node.op_type in _INTEGER_GEMMS]
            if gemms:
                cast = ir.node("Cast", inputs=[value], attributes={"to": ir.DataType.INT8})
                cast.outputs[0].dtype = ir.DataType.INT8
                cast.outputs[0].shape = value.shape
                model.graph.insert_before(gemms[0][0], cast)
                for node, i in gemms:
                    node.replace_input_with(i, cast.outputs[0])
        return ir.passes.PassResult(model, modified=bool(self.names))

    def ensures(self, model: ir.Model) -> None:
        wrong = [n for n in self.names if model.graph.initializers[n].dtype not in _SUB_BYTE]
        if wrong:
            raise ir.passes.PostconditionError(f"still not INT4/INT2: {wrong[:3]}")
        if _sub_byte_into_integer_gemm(model):
            raise ir.passes.PostconditionError(
                f"a sub-byte weight into an integer GEMM: {_sub_byte_into_integer_gemm(model)[:3]}"
            )
