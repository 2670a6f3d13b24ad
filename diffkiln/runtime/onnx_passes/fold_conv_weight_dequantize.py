"""Dequantize convolution weights once, at session build, instead of on every call.

A diffkiln QDQ graph feeds each quantized ``Conv`` its weight through ``DequantizeLinear`` on an
int8 initializer, and keeps the convolution's output in float (as the torch runtime computes it,
and as TensorRT's explicit quantization takes it). onnxruntime's CPU provider has no integer
convolution with a float output (``ConvInteger`` is 4.4x slower at full size), so it runs these as
float convolutions, and, because its constant folding deliberately leaves ``DequantizeLinear``
alone, it dequantizes every weight again on every call and cannot give the convolution its blocked
NCHWc layout (which needs a constant weight).

This pass replaces each such weight by the float32 initializer that ``DequantizeLinear`` computes:
``(q - zero_point) * scale``, in float32, the operator's own definition, so the convolution sees
the same values as before. Activations keep their QuantizeLinear/DequantizeLinear, so the graph
still computes W8A8. Cost: the folded weights are resident in float32 (4x their int8 bytes).
A scale or zero point stored as float16 behind a ``Cast`` (``Float16InitializersPass``) is read
through it. A convolution whose output is requantized (consumed only by ``QuantizeLinear``,
``QuantizeConfig.requantize_conv_outputs``) is left alone: onnxruntime fuses it, with its input,
weight and output QDQ, into an integer QLinearConv, which a float weight would prevent.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedNodesPass

__all__ = ["FoldConvWeightDequantizePass"]


def _constant(value: ir.Value | None) -> np.ndarray | None:
    """The array of an initializer, or of a ``Cast`` of one (read in its stored type)."""
    if value is None:
        return None
    if value.const_value is not None:
        return value.const_value.numpy()
    producer = value.producer()
    if producer is not None and producer.op_type == "Cast" and producer.domain == "" and producer.inputs:
        source = producer.inputs[0]
        if source is not None and source.const_value is not None:
            to = producer.attributes.get_int("to", 0)
            return source.const_value.numpy().astype(ir.DataType(to).numpy())
    return None


def _requantized(conv: ir.Node) -> bool:
    """True when every use of the convolution's output is a ``QuantizeLinear`` (and it is no graph
    output): onnxruntime's QLinearConv fusion then applies."""
    uses = list(conv.outputs[0].uses())
    return (
        bool(uses)
        and not conv.outputs[0].is_graph_output()
        and all(u.node.op_type == "QuantizeLinear" and u.node.domain == "" for u in uses)
    )


def _foldable(conv: ir.Node) -> np.ndarray | None:
    """The float32 weight that ``conv``'s weight ``DequantizeLinear`` computes, when all its inputs are constant."""
    if conv.op_type != "Conv" or conv.domain != "" or len(conv.inputs) < 2 or conv.inputs[1] is None:
        return None
    dq = conv.inputs[1].producer()
    if dq is None or dq.op_type != "DequantizeLinear" or dq.domain != "":
        return None
    if _requantized(conv):
        return None
    if dq.attributes.get_int("block_size", 0):
        return None  # blocked scales: left for onnxruntime to run
    q = _constant(dq.inputs[0])
    scale = _constant(dq.inputs[1] if len(dq.inputs) > 1 else None)
    if q is None or scale is None or q.dtype.kind not in "iu":
        return None
    zero = _constant(dq.inputs[2]) if len(dq.inputs) > 2 and dq.inputs[2] is not None else np.zeros((), q.dtype)
    if zero is None:
        return None
    axis = dq.attributes.get_int("axis", 1) % q.ndim
    shape = [-1 if i == axis else 1 for i in range(q.ndim)] if scale.ndim == 1 else list(scale.shape)
    # DequantizeLinear: y = (x - zero_point) * scale, computed in float32 (the scale's type here).
    centred = q.astype(np.int32) - zero.astype(np.int32).reshape(shape)
    weight = (centred.astype(np.float32) * scale.astype(np.float32).reshape(shape)).astype(np.float32)
    return weight


class FoldConvWeightDequantizePass(ir.passes.InPlacePass):
    """Each ``Conv`` weight computed by ``DequantizeLinear`` from constants becomes a float32 initializer.

    The nodes and initializers left without users (the weights' ``DequantizeLinear`` and their
    scales' ``Cast``) are removed (onnx-ir's ``RemoveUnusedNodesPass``). Convolutions whose
    weight is anything else are left as they are.
    """

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        folded = 0
        for node in list(graph):
            weight = _foldable(node)
            old = node.inputs[1] if len(node.inputs) > 1 else None
            if weight is None or old is None:
                continue
            name = f"{old.name}.dequantized"
            value = ir.Value(
                name=name,
                shape=ir.Shape(weight.shape),
                type=ir.TensorType(ir.DataType.FLOAT),
                const_value=ir.Tensor(weight, name=name),
            )
            graph.register_initializer(value)
            node.replace_input_with(1, value)
            folded += 1
        if folded:
            # The weight DequantizeLinear nodes (and the Casts of their scales) are now dead code.
            RemoveUnusedNodesPass()(model)
        return ir.passes.PassResult(model, modified=bool(folded))

    def ensures(self, model: ir.Model) -> None:
        left = [n.name for n in model.graph if _foldable(n) is not None]
        if left:
            raise ir.passes.PostconditionError(f"convolutions still dequantize constant weights: {left[:3]}")
