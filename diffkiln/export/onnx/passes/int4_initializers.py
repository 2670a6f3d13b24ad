"""Store sub-byte weight codes (4- and 2-bit layers) as INT4 initializers, two codes per byte."""

from __future__ import annotations

from collections.abc import Iterable

import onnx_ir as ir

__all__ = ["Int4InitializersPass"]


class Int4InitializersPass(ir.passes.InPlacePass):
    """Retype the named int8 initializers whose codes lie in [-8, 7] as INT4 (opset >= 21).

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
        return ir.passes.PassResult(model, modified=bool(self.names))

    def ensures(self, model: ir.Model) -> None:
        wrong = [n for n in self.names if model.graph.initializers[n].dtype != ir.DataType.INT4]
        if wrong:
            raise ir.passes.PostconditionError(f"still not INT4: {wrong[:3]}")
