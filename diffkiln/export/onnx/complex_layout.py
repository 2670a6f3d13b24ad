"""Complex tensors through layout ops, for ONNX: rotary tables that denoisers keep as complex
numbers (QwenImage's ``pos_freqs``, Lumina2's ``freqs_cis``; ``x * freqs`` after
``view_as_complex``).

ONNX has no complex type; torch.onnx carries a complex tensor as a real one with a trailing axis of
2 and has complex translations for the arithmetic (``mul``, ``add``, ``view_as_real``) and some
layout ops (``cat``, ``slice``, ``view``, ``permute``), but not for others: ``split_with_sizes``,
``unsqueeze``, ``expand``, ``select``, ``index``. An export that meets one fails ("no
decompositions registered for the complex-valued input"). This pass, on the ExportedProgram,
rewrites each such op on a complex tensor as the same op on its real view (``view_as_real``: the
trailing axis of 2 added; dims made non-negative, sizes extended by that axis) followed by
``view_as_complex``. Values are unchanged: a layout op moves whole complex numbers.

    requires: an ExportedProgram's graph, each node's ``meta["val"]`` set (torch.export's).
    ensures:  no op of :data:`LAYOUT_OPS` takes a complex tensor.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from typing import Any

import torch
from torch import fx

__all__ = ["LAYOUT_OPS", "computes_in_complex", "lower_complex_layout"]

aten = torch.ops.aten
Args = tuple[list[Any], dict[str, Any]]


def _dim(args: list[Any], kwargs: dict[str, Any], index: int, rank: int) -> Args:
    """The dim argument at ``index`` (or ``kwargs["dim"]``, default 0) made non-negative for
    ``rank``: a negative dim would count from the added trailing axis."""
    if len(args) > index:
        args[index] = args[index] % rank
    else:
        kwargs["dim"] = kwargs.get("dim", 0) % rank
    return args, kwargs


LAYOUT_OPS: dict[Any, Callable[[list[Any], dict[str, Any], int], Args]] = {
    aten.split_with_sizes.default: lambda a, k, r: _dim(a, k, 2, r),
    aten.split.Tensor: lambda a, k, r: _dim(a, k, 2, r),
    aten.unbind.int: lambda a, k, r: _dim(a, k, 1, r),
    aten.unsqueeze.default: lambda a, k, r: _dim(a, k, 1, r + 1),
    aten.select.int: lambda a, k, r: _dim(a, k, 1, r),
    aten.index_select.default: lambda a, k, r: _dim(a, k, 1, r),
    aten.squeeze.dims: lambda a, k, r: ([a[0], [d % r for d in a[1]], *a[2:]], k),
    aten.expand.default: lambda a, k, r: ([a[0], [*a[1], 2], *a[2:]], k),
    aten.repeat.default: lambda a, k, r: ([a[0], [*a[1], 1]], k),
    aten.index.Tensor: lambda a, k, r: (a, k),  # indices address the leading axes only
    aten.alias.default: lambda a, k, r: (a, k),
}
"""Layout op -> its arguments on the real view (``args`` with the real input first, ``kwargs``,
the complex input's rank)."""


def _is_complex(value: Any) -> bool:
    return isinstance(value, torch.Tensor) and value.is_complex()


def computes_in_complex(exc: BaseException) -> bool:
    """Whether an export failed on an op that torch.onnx has no complex translation for (the
    dispatcher's "complex-valued input" failure, anywhere in the exception's chain)."""
    seen: BaseException | None = exc
    while seen is not None:
        if "complex-valued" in str(seen):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _view_as_complex(graph: fx.Graph, real: fx.Node, value: Any) -> fx.Node:
    with graph.inserting_after(real):
        node = graph.call_function(aten.view_as_complex.default, (real,))
    node.meta["val"] = value
    return node


def lower_complex_layout(module: fx.GraphModule) -> int:
    """Rewrite each op of :data:`LAYOUT_OPS` on a complex tensor in ``module``'s graph as the op on
    its real view, then ``view_as_complex``; returns how many were rewritten."""
    graph = module.graph
    count = 0
    for node in list(graph.nodes):
        source = node.args[0] if node.op == "call_function" and node.args else None
        if node.target not in LAYOUT_OPS or not isinstance(source, fx.Node) or not _is_complex(source.meta.get("val")):
            continue
        rank = source.meta["val"].dim()
        with graph.inserting_before(node):
            real = graph.call_function(aten.view_as_real.default, (source,))
            real.meta["val"] = torch.view_as_real(source.meta["val"])
            args, kwargs = LAYOUT_OPS[node.target]([real, *node.args[1:]], dict(node.kwargs), rank)
            moved = graph.call_function(node.target, tuple(args), kwargs)
        out = node.meta["val"]
        if isinstance(out, (list, tuple)):  # split, unbind: each item read through getitem
            moved.meta["val"] = [torch.view_as_real(o) for o in out]
            for user in list(node.users):
                if user.target is not operator.getitem:
                    raise ValueError(f"{node.name}: a list of complex tensors read by {user.target}")
                with graph.inserting_after(user):
                    item = graph.call_function(operator.getitem, (moved, user.args[1]))
                item.meta["val"] = moved.meta["val"][user.args[1]]
                user.replace_all_uses_with(_view_as_complex(graph, item, user.meta["val"]))
                graph.erase_node(user)
        else:
            moved.meta["val"] = torch.view_as_real(out)
            node.replace_all_uses_with(_view_as_complex(graph, moved, out))
        graph.erase_node(node)
        count += 1
    graph.lint()
    module.recompile()
    return count
