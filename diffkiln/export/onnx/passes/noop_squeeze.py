"""Replace ``Squeeze`` nodes whose axes do not have size 1 by ``Identity``.

``torch.squeeze(x, dim)`` is a no-op when that dimension is not 1 (PixArt's transformer calls
``hidden_states.squeeze(1)`` on a (B, N, C) tensor); torch.onnx (2.13) still emits
``Squeeze(axes=[dim])``, which ONNX defines only for size-1 axes, so the checker and onnxruntime
reject the model. Runs while the exporter's shape annotations are still present.
"""

from __future__ import annotations

import onnx_ir as ir

__all__ = ["NoopSqueezePass"]


def _is_noop(node: ir.Node) -> bool:
    if node.op_type != "Squeeze" or node.domain not in ("", "ai.onnx") or len(node.inputs) < 2:
        return False
    data, axes = node.inputs[0], node.inputs[1]
    if data is None or axes is None or data.shape is None or axes.const_value is None:
        return False
    dims = list(data.shape)
    wanted = [int(a) % len(dims) for a in axes.const_value.numpy().reshape(-1)]
    return all(isinstance(dims[a], int) and dims[a] != 1 for a in wanted)


class NoopSqueezePass(ir.passes.InPlacePass):
    """``Squeeze`` on axes of known size != 1 becomes ``Identity``."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        targets = [node for node in graph if _is_noop(node)]
        for node in targets:
            data = node.inputs[0]
            assert data is not None  # checked by _is_noop
            identity = ir.Node("", "Identity", inputs=[data])
            old = node.outputs[0]
            new = identity.outputs[0]
            new.name, new.shape, new.type = old.name, old.shape, old.type
            graph.insert_before(node, identity)
            old.replace_all_uses_with(new, replace_graph_outputs=True)
            graph.remove(node, safe=True)
        return ir.passes.PassResult(model, modified=bool(targets))

    def ensures(self, model: ir.Model) -> None:
        if any(_is_noop(node) for node in model.graph):
            raise ir.passes.PostconditionError("a Squeeze on a non-1 axis remains")
