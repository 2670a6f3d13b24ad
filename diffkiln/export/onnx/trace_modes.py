"""Torch-function modes the ONNX export traces under, for code patterns torch.export refuses but
whose meaning in an inference trace is plain.

``tensor.data`` read inside ``forward``: CogVideoX's patch embedding builds its position table at a
size other than the configured one as ``table.data[:, text_len:].copy_(positions)``. torch.export
cannot follow a write through ``.data`` (the alias leaves the traced graph), so the table became a
lifted constant holding a fake tensor and the export failed. Under ``torch.no_grad`` in a trace,
``.data`` and ``.detach()`` name the same storage; ``.detach()`` is a view torch.export follows, so
the write becomes part of the graph (a ``slice_scatter`` once functionalized) and the table is
computed from the input's size. Only reads are redirected: an assignment ``x.data = y`` is left as
it is.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.overrides import TorchFunctionMode

__all__ = ["DataAsDetach"]


class DataAsDetach(TorchFunctionMode):
    """Within the mode, reading ``tensor.data`` gives ``tensor.detach()`` (see the module docstring)."""

    def __torch_function__(self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None) -> Any:
        # The getter reaches the mode as a fresh ``method-wrapper`` each time; its ``__self__`` is
        # the descriptor, which is one object.
        if getattr(func, "__self__", None) is torch._C.TensorBase.data and len(args) == 1:
            return args[0].detach()
        return func(*args, **(kwargs or {}))
