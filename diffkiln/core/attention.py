"""Attention layers found from the data flow, and their attention calls intercepted by name.

Every attention implementation in diffusers (the ``AttnProcessor2_0`` family and the ``native``
backend of ``dispatch_attention_fn``) ends in ``torch.nn.functional.scaled_dot_product_attention``
on ``(batch, heads, tokens, head_dim)`` tensors. So an attention layer is, by definition here, the
innermost module whose forward calls SDPA, found by running the model once, whatever its class or
attribute names are. :class:`AttentionCalls` intercepts those calls with a ``TorchFunctionMode``
and hands each to a handler together with the name of the layer it came from; named forward hooks
(removed on exit) keep track of which layer is running. With ``only`` given, the mode is active only
while one of those layers runs (entered by its pre-hook, left by its post-hook, also on an
exception), so the rest of the model's ops do not pass through it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from diffkiln.core.hooks import scoped_hooks

__all__ = ["AttentionCall", "AttentionCalls", "AttentionLayer", "attention_calls", "find_attention_layers"]


@dataclass(frozen=True)
class AttentionCall:
    """One SDPA call of an attention layer.

    Attributes:
        layer: qualified name of the innermost module that made the call.
        query, key, value: the ``(batch, heads, tokens, head_dim)`` tensors.
        attn_mask: the mask passed, or None.
        is_causal: the causal flag passed.
        scale: the softmax scale passed (None: ``1/sqrt(head_dim)``).
        index: the call's position among the layer's calls in this run (0 for the first).
    """

    layer: str
    query: torch.Tensor
    key: torch.Tensor
    value: torch.Tensor
    attn_mask: torch.Tensor | None
    is_causal: bool
    scale: float | None
    index: int

    def dense(self) -> torch.Tensor:
        """The call as SDPA would run it."""
        return F.scaled_dot_product_attention(self.query, self.key, self.value, attn_mask=self.attn_mask,
                                              is_causal=self.is_causal, scale=self.scale)  # fmt: skip


Handler = Callable[[AttentionCall], "torch.Tensor | None"]


def _bind(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, ...]:
    names = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
    defaults: dict[str, Any] = {"attn_mask": None, "dropout_p": 0.0, "is_causal": False, "scale": None,
                                "enable_gqa": False}  # fmt: skip
    bound = {**defaults, **dict(zip(names, args, strict=False)), **kwargs}
    return tuple(bound[n] for n in names)


class AttentionCalls(TorchFunctionMode):
    """Routes every SDPA call made inside ``model`` to ``handler`` (see the module docstring).

    The handler returns the attention output to use, or None to run SDPA as called. Calls with
    dropout or grouped-query heads are always run as called. Use as a context manager: the module
    hooks that name the running layer are registered on entry and removed on exit.

    Args:
        model: the model whose attention calls are intercepted.
        handler: called with each :class:`AttentionCall`.
        only: intercept calls from these layers only (None: every module).
    """

    def __init__(self, model: nn.Module, handler: Handler, only: set[str] | None = None) -> None:
        super().__init__()
        self.model, self.handler, self.only = model, handler, only
        self.stack: list[str] = []
        self.counts: dict[str, int] = {}
        self._hooks: Any = None

    def __enter__(self) -> AttentionCalls:
        self._hooks = scoped_hooks()
        registry = self._hooks.__enter__()
        for name, module in self.model.named_modules():
            if self.only is not None and name not in self.only:
                continue
            registry.add_forward_pre_hook(f"diffkiln.attention.enter.{name}", module, self._enter(name))
            registry.add_forward_hook(f"diffkiln.attention.exit.{name}", module, self._exit,
                                      always_call=self.only is not None)  # fmt: skip
        if self.only is None:
            super().__enter__()
        return self

    def _enter(self, name: str) -> Callable[..., None]:
        def enter(*_a: Any) -> None:
            if self.only is not None and not self.stack:
                super(AttentionCalls, self).__enter__()  # scoped: active inside the named layers only
            self.stack.append(name)

        return enter

    def _exit(self, *_a: Any) -> None:
        self.stack.pop()  # returns None: a forward hook's return value would replace the output
        if self.only is not None and not self.stack:
            super().__exit__(None, None, None)

    def __exit__(self, *exc: Any) -> None:
        if self.only is None:
            super().__exit__(*exc)
        self._hooks.__exit__(*exc)
        self.stack.clear()

    def __torch_function__(self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if func is not F.scaled_dot_product_attention or not self.stack:
            return func(*args, **kwargs)
        q, k, v, mask, dropout, causal, scale, gqa = _bind(args, kwargs)
        if dropout or gqa or q.dim() != 4:
            return func(*args, **kwargs)
        layer = self.stack[-1]
        index = self.counts.get(layer, 0)
        self.counts[layer] = index + 1
        out = self.handler(AttentionCall(layer, q, k, v, mask, bool(causal), scale, index))
        return func(*args, **kwargs) if out is None else out


@contextmanager
def attention_calls(model: nn.Module, handler: Handler, only: set[str] | None = None) -> Iterator[AttentionCalls]:
    """:class:`AttentionCalls` as a context manager function."""
    with AttentionCalls(model, handler, only) as calls:
        yield calls


@dataclass(frozen=True)
class AttentionLayer:
    """An attention layer as one run of the model showed it.

    Attributes:
        name: the module's qualified name.
        heads: attention heads.
        q_len: query tokens.
        kv_len: key tokens.
        masked: the call passed a mask (or was causal).
        calls: SDPA calls it made in the run.
    """

    name: str
    heads: int
    q_len: int
    kv_len: int
    masked: bool
    calls: int


def find_attention_layers(model: nn.Module, run: Callable[[], Any]) -> list[AttentionLayer]:
    """The attention layers of ``model`` in call order: the innermost modules whose forward called
    SDPA while ``run()`` ran (the shapes are from each layer's first call)."""
    seen: dict[str, AttentionLayer] = {}

    def record(call: AttentionCall) -> None:
        if call.layer not in seen:
            masked = call.attn_mask is not None or call.is_causal
            seen[call.layer] = AttentionLayer(call.layer, call.query.shape[1], call.query.shape[2],
                                              call.key.shape[2], masked, 0)  # fmt: skip

    with torch.no_grad(), attention_calls(model, record) as calls:
        run()
    return [AttentionLayer(**{**vars(layer), "calls": calls.counts[name]}) for name, layer in seen.items()]
