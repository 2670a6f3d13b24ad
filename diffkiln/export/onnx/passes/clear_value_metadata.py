"""Clear the metadata of graph inputs and initializers (torch.export's bookkeeping).

torch.onnx records, on every parameter and buffer, its export kind, persistence and original node
name (``pkg.torch.export.graph_signature.InputSpec.*``, ``pkg.torch.onnx.original_node_name``).
No runtime reads them, and serializing them adds a ``value_info`` entry per initializer: 118 KB
of shapes-unet's 3.2 MB W8A8 denoiser. onnx-ir's ``ClearMetadataAndDocStringPass`` clears nodes
and functions, not these values.
"""

from __future__ import annotations

import onnx_ir as ir

__all__ = ["ClearValueMetadataPass"]


def _values(model: ir.Model) -> list[ir.Value]:
    return [*model.graph.inputs, *model.graph.initializers.values()]


class ClearValueMetadataPass(ir.passes.InPlacePass):
    """Empty ``metadata_props`` of every graph input and initializer."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        cleared = [v for v in _values(model) if v.metadata_props]
        for value in cleared:
            value.metadata_props.clear()
        return ir.passes.PassResult(model, modified=bool(cleared))

    def ensures(self, model: ir.Model) -> None:
        if any(v.metadata_props for v in _values(model)):
            raise ir.passes.PostconditionError("an input or initializer still has metadata")
