"""Drop the shape annotations of intermediate values and initializers (the model's ``value_info``).

Runtimes (onnxruntime, TensorRT, ATC) infer intermediate shapes again at load; an initializer's
tensor carries its own dtype and dims, so its ``value_info`` entry repeats them. In a small QDQ
model they are a sizeable share of the file (236 KB of intermediates and 49 KB of initializer
entries in shapes-unet's 3.2 MB W8A8 denoiser). Graph inputs and outputs keep their types and
shapes. Runs last: earlier passes read the initializers' dtypes.
"""

from __future__ import annotations

import onnx_ir as ir

__all__ = ["DropShapeInfoPass"]


def _annotated(graph: ir.Graph) -> list[ir.Value]:
    outputs = {id(v) for v in graph.outputs}
    inputs = {id(v) for v in graph.inputs}
    intermediates = [v for node in graph for v in node.outputs if id(v) not in outputs]
    initializers = [v for v in graph.initializers.values() if id(v) not in inputs and v.const_value is not None]
    return intermediates + initializers


class DropShapeInfoPass(ir.passes.InPlacePass):
    """Clear the type and shape of every value produced by a node (not a graph output) and of
    every initializer that is not a graph input."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        values = _annotated(model.graph)
        for value in values:
            value.type = None
            value.shape = None
        return ir.passes.PassResult(model, modified=bool(values))

    def ensures(self, model: ir.Model) -> None:
        if any(v.type is not None for v in _annotated(model.graph)):
            raise ir.passes.PostconditionError("an intermediate value or initializer still has a type")
