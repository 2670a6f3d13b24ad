"""Complex tensors through layout ops, for ONNX: rotary tables that denoisers keep as complex
numbers (QwenImage's ``pos_freqs``, Lumina2's ``freqs_cis``; ``x * freqs`` after
``view_as_complex``).

ONNX has no complex type; torch.onnx carries a complex tensor as a real one with a trailing axis of
2 and has complex translations for the arithmetic (``mul``, ``add``, ``view_as_real``) and some
layout ops (``cat``, ``slice``, ``view``, ``permute``), but not for others: ``split_with_sizes``,
``unsqueeze``, ``expand``, ``select``, ``index``, ``where``, the padding of ``pad_sequence`` and
``constant_pad_nd``, and the factories ``new_full``, ``full_like``, ``full``. An export that meets
one fails ("no decompositions registered for the complex-valued input"). This pass, on the
ExportedProgram, rewrites each such op on a complex tensor as the same op on its real view
(``view_as_real``: the trailing axis of 2 added; dims made non-negative, sizes extended by that
axis) followed by ``view_as_complex``. Values are unchanged: a layout op moves whole complex numbers, and a
padding or a fill is taken only at zero, which is zero in both parts of the real view.

    requires: an ExportedProgram's graph, each node's ``meta["val"]`` set (torch.export's).
    ensures:  no op of :data:`LAYOUT_OPS` takes a complex tensor, and no ``where`` or ``full`` gives one.
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


def _zero(value: Any) -> None:
    """Only a zero fill is the same on the real view (``v`` there is ``v + vj``)."""
    if value != 0:
        raise ValueError(f"a complex tensor filled or padded with {value!r}: only zero has the same real view")


def _real_dtype(kwargs: dict[str, Any]) -> dict[str, Any]:
    """``kwargs`` with a complex ``dtype`` made its real counterpart."""
    dtype = kwargs.get("dtype")
    if isinstance(dtype, torch.dtype) and dtype.is_complex:
        kwargs["dtype"] = torch.empty(0, dtype=dtype).real.dtype
    return kwargs


def _sized(args: list[Any], kwargs: dict[str, Any], fill: Any) -> Args:
    """``new_full``/``new_zeros`` on the real view: the size gains the trailing axis."""
    _zero(fill)
    return [args[0], [*args[1], 2], *args[2:]], _real_dtype(kwargs)


def _padded(args: list[Any], kwargs: dict[str, Any], value: Any) -> Args:
    """A padding (or ``full_like``'s fill) ``value``: arguments unchanged, only zero allowed."""
    _zero(value)
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
    aten.new_full.default: lambda a, k, r: _sized(a, k, a[2]),
    aten.new_zeros.default: lambda a, k, r: _sized(a, k, 0),
    aten.full_like.default: lambda a, k, r: _padded(a, _real_dtype(k), a[1]),
    # pad_sequence's first argument is the list of tensors (each given as its real view).
    aten.pad_sequence.default: lambda a, k, r: _padded(a, k, a[2] if len(a) > 2 else k.get("padding_value", 0.0)),
    # The pad list starts at the last axis: the real view's trailing axis is left unpadded.
    aten.constant_pad_nd.default: lambda a, k, r: _padded(
        [a[0], [0, 0, *a[1]], *a[2:]], k, a[2] if len(a) > 2 else k.get("value", 0)
    ),
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


def _real_view(graph: fx.Graph, node: fx.Node) -> fx.Node:
    real = graph.call_function(aten.view_as_real.default, (node,))
    real.meta["val"] = torch.view_as_real(node.meta["val"])
    return real


def _replace(graph: fx.Graph, node: fx.Node, moved: fx.Node) -> None:
    """``node`` (complex) replaced by ``view_as_complex(moved)`` (its real view)."""
    moved.meta["val"] = torch.view_as_real(node.meta["val"])
    node.replace_all_uses_with(_view_as_complex(graph, moved, node.meta["val"]))
    graph.erase_node(node)


def _lower_where(graph: fx.Graph, node: fx.Node) -> bool:
    """``where(cond, a, b)`` giving a complex tensor (Z-Image masks its padded rotary rows), on the
    real views of ``a`` and ``b``, the condition given the trailing axis; False if not that."""
    cond, a, b = [*node.args, None, None, None][:3]
    if not (isinstance(cond, fx.Node) and isinstance(a, fx.Node) and isinstance(b, fx.Node)):
        return False
    if not (_is_complex(a.meta.get("val")) and _is_complex(b.meta.get("val"))):
        return False
    with graph.inserting_before(node):
        axis = graph.call_function(aten.unsqueeze.default, (cond, -1))
        axis.meta["val"] = cond.meta["val"].unsqueeze(-1)
        moved = graph.call_function(aten.where.self, (axis, _real_view(graph, a), _real_view(graph, b)))
    _replace(graph, node, moved)
    return True


def _lower_full(graph: fx.Graph, node: fx.Node) -> bool:
    """``full(size, 0, dtype=complex)`` (a ``zeros_like`` decomposed) as ``full`` of the real view."""
    if not _is_complex(node.meta.get("val")):
        return False
    size, fill = node.args[0], node.args[1]
    _zero(fill)
    with graph.inserting_before(node):
        moved = graph.call_function(aten.full.default, ([*size, 2], fill), _real_dtype(dict(node.kwargs)))  # type: ignore[misc]
    _replace(graph, node, moved)
    return True


_SPECIAL: dict[Any, Callable[[fx.Graph, fx.Node], bool]] = {
    aten.where.self: _lower_where,
    aten.full.default: _lower_full,
}
"""Ops whose complex operand is not the first argument: rewritten by their own function."""


def _int64_indices(graph: fx.Graph, node: fx.Node) -> None:
    """``index`` on a complex tensor with int32 indices (Z-Image's position ids): the indices as
    int64, which ONNX's ``GatherND`` requires (torchlib passes int32 through, and the graph then
    fails shape inference)."""
    indices = node.args[1] if len(node.args) > 1 else None
    if not isinstance(indices, (list, tuple)):
        return
    cast = []
    for index in indices:
        value = index.meta.get("val") if isinstance(index, fx.Node) else None
        if isinstance(value, torch.Tensor) and value.dtype == torch.int32:
            with graph.inserting_before(node):
                wide = graph.call_function(aten._to_copy.default, (index,), {"dtype": torch.int64})
            wide.meta["val"] = value.to(torch.int64)
            cast.append(wide)
        else:
            cast.append(index)
    node.args = (node.args[0], cast, *node.args[2:])


def lower_complex_layout(module: fx.GraphModule) -> int:
    """Rewrite each op of :data:`LAYOUT_OPS` on a complex tensor in ``module``'s graph as the op on
    its real view, then ``view_as_complex``; returns how many were rewritten."""
    graph = module.graph
    count = 0
    for node in list(graph.nodes):
        if node.op != "call_function":
            continue
        special = _SPECIAL.get(node.target)
        if special is not None:
            count += special(graph, node)
            continue
        first = node.args[0] if node.args else None
        listed = first if isinstance(first, (list, tuple)) else [first]  # pad_sequence: a list
        sources = [n for n in listed if isinstance(n, fx.Node) and _is_complex(n.meta.get("val"))]
        if node.target not in LAYOUT_OPS or not sources or len(sources) != len(listed):
            continue
        rank = sources[0].meta["val"].dim()
        if node.target is aten.index.Tensor:
            _int64_indices(graph, node)
        with graph.inserting_before(node):
            reals = [_real_view(graph, source) for source in sources]
            head = reals if isinstance(first, (list, tuple)) else reals[0]
            args, kwargs = LAYOUT_OPS[node.target]([head, *node.args[1:]], dict(node.kwargs), rank)
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
            graph.erase_node(node)
        else:
            _replace(graph, node, moved)
        count += 1
    graph.lint()
    module.recompile()
    return count
