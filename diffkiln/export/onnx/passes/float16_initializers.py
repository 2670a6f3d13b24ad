"""Store float32 initializers whose values are exact in float16 as float16, cast back in the graph.

A bundle written with ``--float-storage float16`` holds its scales, biases, BOS rows and FP tensors
as float16; the exported graph computes in float32, so without this pass each of them would be
written at twice its stored size. Only values that round-trip exactly are converted, so the pass
never changes what the graph computes, and only where that makes the file smaller: the ``Cast``
node and the extra names cost about ``2 * len(name) + 48`` bytes, which a small per-channel scale
or bias (a few dozen values) does not repay.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

__all__ = ["Float16InitializersPass"]


_CAST_BYTES = 48
"""Serialized bytes of a Cast node beyond its names: op type, attribute, node name, proto tags."""


def _worth_converting(value: ir.Value, min_elements: int) -> bool:
    """Exact in float16, and the 2 bytes saved per value outweigh the Cast node and names."""
    if value.dtype != ir.DataType.FLOAT or value.const_value is None or value.is_graph_input():
        return False
    array = value.const_value.numpy()
    if array.size < min_elements or 2 * array.size <= 2 * len(value.name or "") + _CAST_BYTES:
        return False
    with np.errstate(over="ignore"):
        return bool(np.array_equal(array.astype(np.float16).astype(np.float32), array))


class Float16InitializersPass(ir.passes.InPlacePass):
    """Float32 initializers exact in float16 become float16 initializers followed by a ``Cast``.

    Args:
        min_elements: smaller initializers always stay float32. Default 16; beyond it, an
            initializer is converted only when that saves bytes (see the module docstring).
    """

    def __init__(self, min_elements: int = 16):
        super().__init__()
        self.min_elements = min_elements

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        chosen = [v for v in graph.initializers.values() if _worth_converting(v, self.min_elements)]
        first = graph.node(0) if len(graph) else None
        for value in chosen:
            assert value.const_value is not None and value.name is not None  # chosen above
            name = value.name
            del graph.initializers[name]
            half = ir.Value(
                name=f"{name}.f16",
                shape=value.shape,
                type=ir.TensorType(ir.DataType.FLOAT16),
                const_value=ir.Tensor(value.const_value.numpy().astype(np.float16), name=f"{name}.f16"),
            )
            graph.register_initializer(half)
            cast = ir.Node("", "Cast", inputs=[half], attributes=[ir.AttrInt64("to", ir.DataType.FLOAT)])
            out = cast.outputs[0]
            value.replace_all_uses_with(out)
            out.name, out.shape, out.type = name, value.shape, ir.TensorType(ir.DataType.FLOAT)
            if first is None:
                graph.append(cast)
            else:
                graph.insert_before(first, cast)
        return ir.passes.PassResult(model, modified=bool(chosen))

    def ensures(self, model: ir.Model) -> None:
        left = [n for n, v in model.graph.initializers.items() if _worth_converting(v, self.min_elements)]
        if left:
            raise ir.passes.PostconditionError(f"float32 initializers exact in float16 remain: {left[:3]}")
