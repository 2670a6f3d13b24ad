"""Name initializers as the model names its parameters, without the export wrapper's attribute.

Each component is exported through a small wrapper module (``_Denoiser`` holds the model as
``denoiser``), so torch.export names every parameter ``denoiser.down_blocks.0...``. Dropping the
prefix gives the names of the model's own ``state_dict`` (what users look up), and, since every
name is written once per initializer and once per use, 18 KB of shapes-unet's 3.05 MB W8A8
denoiser.
"""

from __future__ import annotations

import onnx_ir as ir

__all__ = ["StripNamePrefixPass"]


def _all_names(graph: ir.Graph) -> set[str]:
    names = {v.name for v in (*graph.inputs, *graph.outputs, *graph.initializers.values()) if v.name}
    names.update(o.name for node in graph for o in node.outputs if o.name)
    return names


class StripNamePrefixPass(ir.passes.InPlacePass):
    """Rename each initializer ``prefix + rest`` to ``rest`` where no other value is named ``rest``.

    Args:
        prefix: the wrapper's attribute path with its trailing dot, e.g. ``"denoiser."``.

    Raises:
        ValueError: an empty prefix, or one without the trailing dot.
    """

    def __init__(self, prefix: str):
        super().__init__()
        if not prefix.endswith(".") or prefix == ".":
            raise ValueError(f"prefix must be an attribute path ending with '.', e.g. 'denoiser.', got {prefix!r}")
        self.prefix = prefix

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        taken = _all_names(graph)
        renamed = 0
        for value in list(graph.initializers.values()):
            name = value.name or ""
            short = name[len(self.prefix) :]
            if name.startswith(self.prefix) and short and short not in taken:
                value.name = short  # onnx-ir renames the initializer entry and every use with it
                taken.add(short)
                renamed += 1
        return ir.passes.PassResult(model, modified=bool(renamed))

    def ensures(self, model: ir.Model) -> None:
        # A name may still start with the prefix (the model's own path can: CLIP's
        # ``encoder.layers``, held by the wrapper's ``encoder``); what must hold is that every
        # use still reaches a value of the graph under its new name.
        graph = model.graph
        known = {v.name for v in (*graph.inputs, *graph.initializers.values())}
        known.update(o.name for node in graph for o in node.outputs)
        dangling = [i.name for node in graph for i in node.inputs if i is not None and i.name not in known]
        if dangling:
            raise ir.passes.PostconditionError(f"node inputs name no value after renaming: {dangling[:3]}")
