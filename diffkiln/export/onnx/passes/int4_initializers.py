"""Store sub-byte weight codes (4- and 2-bit layers) as INT4 initializers, two codes per byte."""

from __future__ import annotations

from collections.abc import Iterable

import onnx_ir as ir

__all__ = ["Int4InitializersPass"]


_INTEGER_GEMMS = frozenset({"MatMulInteger", "ConvInteger"})


def _int4_into_integer_gemm(model: ir.Model) -> list[str]:
    return [
        node.name or node.op_type
        for node in model.graph
        if node.op_type in _INTEGER_GEMMS and any(v is not None and v.dtype == ir.DataType.INT4 for v in node.inputs)
    ]


class Int4InitializersPass(ir.passes.InPlacePass):
    """Retype the named int8 initializers whose codes lie in [-8, 7] as INT4 (opset >= 21).

    ``MatMulInteger`` and ``ConvInteger`` take 8-bit inputs only, so an INT4 weight they read goes
    through a ``Cast`` to INT8 (onnxruntime folds it once at load; the file keeps two codes per byte).

    Args:
        names: the initializers to retype: the weight codes of the layers below 8 bits. 2-bit codes
            fit INT4 too; ONNX has no 2-bit type that onnxruntime reads.
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
            if codes.min() < -8 or codes.max() > 7:
                raise ir.passes.PreconditionError(f"{name}: codes outside int4 ([{codes.min()}, {codes.max()}])")

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        import ml_dtypes

        for name in self.names:
            value = model.graph.initializers[name]
            assert value.const_value is not None  # checked in requires
            value.const_value = ir.Tensor(value.const_value.numpy().astype(ml_dtypes.int4), name=name)
            value.dtype = ir.DataType.INT4
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
        wrong = [n for n in self.names if model.graph.initializers[n].dtype != ir.DataType.INT4]
        if wrong:
            raise ir.passes.PostconditionError(f"still not INT4: {wrong[:3]}")
        if _int4_into_integer_gemm(model):
            raise ir.passes.PostconditionError(f"INT4 into an integer GEMM: {_int4_into_integer_gemm(model)[:3]}")
