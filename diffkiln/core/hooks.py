"""Named, removable forward hooks, always removed by a context manager.

Like diffusers' ``HookRegistry``: every hook has a name, ``remove(name)`` takes one away, and
leaving the ``with`` block removes all of them, even when the body raises. A method other than
``forward`` (a VAE's ``decode``) takes a pre-hook as an instance attribute that wraps the class's
method; removing the hook deletes the attribute.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

__all__ = [
    "HookRegistry",
    "layer_input",
    "map_output_tensors",
    "output_sample",
    "output_tensors",
    "recording_calls",
    "recording_method_calls",
    "replace_layer_input",
    "scoped_hooks",
]


def layer_input(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """The input of a Linear or convolution call as a hook sees it: the first positional argument,
    or ``input=`` (AnimateDiff's motion modules call ``proj_in(input=x)``); None when neither."""
    return args[0] if args else kwargs.get("input")


def output_sample(out: Any) -> torch.Tensor:
    """A denoiser call's sample as a hook sees its output: the tensor, the first entry of a tuple
    or list, ``.sample`` of an output object, or the first field of another output mapping."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)):
        return out[0]
    return out.sample if hasattr(out, "sample") else next(iter(out.values()))


def output_tensors(out: Any) -> list[torch.Tensor]:
    """Every tensor of a denoiser call's output, in order: the tensor itself, the entries of a tuple
    or list (nested: Z-Image's per-sample list), or an output object's fields (LTX-2 returns a
    prediction for its video latent and one for its audio latent)."""
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (tuple, list)):
        return [t for v in out for t in output_tensors(v)]
    if isinstance(out, dict):
        return [t for v in out.values() for t in output_tensors(v)]
    return []


def map_output_tensors(out: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """``out`` (as :func:`output_tensors` reads it) with each tensor replaced by ``fn(tensor)``, in
    the same structure; other values are kept."""
    if isinstance(out, torch.Tensor):
        return fn(out)
    if isinstance(out, (tuple, list)):
        return type(out)(map_output_tensors(v, fn) for v in out)
    if isinstance(out, dict) and hasattr(out, "__dataclass_fields__"):  # a diffusers/transformers output
        return dataclasses.replace(out, **{k: map_output_tensors(v, fn) for k, v in out.items()})  # type: ignore[type-var]
    if isinstance(out, dict):
        return type(out)({k: map_output_tensors(v, fn) for k, v in out.items()})
    return out


def replace_layer_input(
    args: tuple[Any, ...], kwargs: dict[str, Any], x: torch.Tensor
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """A pre-hook's return value: the call's arguments with its input replaced by ``x``."""
    if args:
        return (x, *args[1:]), kwargs
    return args, {**kwargs, "input": x}


class _MethodHandle:
    """Removes a method pre-hook: deletes the wrapping instance attribute, so that the class's
    method answers again."""

    def __init__(self, obj: Any, method: str, wrapper: Callable[..., Any]):
        self.obj, self.method, self.wrapper = obj, method, wrapper

    def remove(self) -> None:
        if vars(self.obj).get(self.method) is self.wrapper:
            del vars(self.obj)[self.method]


class HookRegistry:
    """Forward (pre-)hooks on modules and pre-hooks on their other methods, keyed by a unique name."""

    def __init__(self) -> None:
        self._handles: dict[str, torch.utils.hooks.RemovableHandle | _MethodHandle] = {}

    def add_forward_hook(self, name: str, module: nn.Module, fn: Callable[..., Any], always_call: bool = False) -> None:
        """Register ``fn(module, args, kwargs, output)`` on ``module`` under ``name``.

        Args:
            always_call: call ``fn`` (with ``output`` None) even when the forward raises.

        Raises:
            ValueError: the name is taken.
        """
        self._check_free(name)
        self._handles[name] = module.register_forward_hook(fn, with_kwargs=True, always_call=always_call)

    def add_forward_pre_hook(self, name: str, module: nn.Module, fn: Callable[..., Any]) -> None:
        """Register ``fn(module, args, kwargs)`` before ``module``'s forward under ``name``.

        Raises:
            ValueError: the name is taken.
        """
        self._check_free(name)
        self._handles[name] = module.register_forward_pre_hook(fn, with_kwargs=True)

    def add_method_pre_hook(self, name: str, obj: Any, method: str, fn: Callable[..., Any]) -> None:
        """Call ``fn(obj, args, kwargs)`` before each call of ``obj.<method>`` (a method of its
        class, not ``forward``: a VAE's ``decode``), under ``name``. The wrapper keeps the
        method's name, docstring and signature.

        Raises:
            ValueError: the name is taken, ``method`` is not a method of the object's class, or the
                object already holds an attribute of that name (another wrapper).
        """
        self._check_free(name)
        unbound = getattr(type(obj), method, None)
        if not callable(unbound) or method == "forward":
            raise ValueError(f"{type(obj).__name__}.{method} is not a method to hook here (forward: a forward hook)")
        if method in vars(obj):
            raise ValueError(f"{type(obj).__name__} instance already holds its own {method!r}; remove that hook first")
        bound = getattr(obj, method)

        @functools.wraps(bound)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            fn(obj, args, kwargs)
            return bound(*args, **kwargs)

        vars(obj)[method] = wrapper
        self._handles[name] = _MethodHandle(obj, method, wrapper)

    def _check_free(self, name: str) -> None:
        if name in self._handles:
            raise ValueError(f"a hook named {name!r} is already registered; remove it first")

    @property
    def names(self) -> list[str]:
        """Names of the hooks currently registered."""
        return list(self._handles)

    def remove(self, name: str) -> None:
        """Remove one hook.

        Raises:
            KeyError: no such hook; the message lists the registered names.
        """
        if name not in self._handles:
            raise KeyError(f"no hook named {name!r}; registered: {self.names}")
        self._handles.pop(name).remove()

    def remove_all(self) -> None:
        """Remove every hook."""
        for handle in self._handles.values():
            handle.remove()
        self._handles.clear()


@contextmanager
def scoped_hooks() -> Iterator[HookRegistry]:
    """A HookRegistry whose hooks are all removed when the block exits, normally or not."""
    registry = HookRegistry()
    try:
        yield registry
    finally:
        registry.remove_all()


def _detached_copy(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return x.detach().clone()
    if isinstance(x, dict):
        return {k: _detached_copy(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(_detached_copy(v) for v in x)
    return x


def _recorder(
    calls: list[tuple[tuple[Any, ...], dict[str, Any]]],
) -> Callable[[Any, tuple[Any, ...], dict[str, Any]], None]:
    """A pre-hook that appends each call's ``(args, kwargs)``, as detached copies, to ``calls``."""

    def record(_owner: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        calls.append((_detached_copy(args), _detached_copy(kwargs)))

    return record


@contextmanager
def recording_calls(name: str, module: nn.Module) -> Iterator[list[tuple[tuple[Any, ...], dict[str, Any]]]]:
    """Within the block, every call of ``module`` appends ``(args, kwargs)`` (detached copies) to
    the yielded list, through a named pre-hook that is removed on exit.

    Args:
        name: the hook's name.
        module: the module whose calls are recorded (e.g. a denoiser, to replay its inputs).
    """
    calls: list[tuple[tuple[Any, ...], dict[str, Any]]] = []
    with scoped_hooks() as hooks:
        hooks.add_forward_pre_hook(name, module, _recorder(calls))
        yield calls


@contextmanager
def recording_method_calls(name: str, obj: Any, method: str) -> Iterator[list[tuple[tuple[Any, ...], dict[str, Any]]]]:
    """As :func:`recording_calls`, for a method other than ``forward`` (a VAE's ``decode``, whose
    arguments, such as SVD's ``num_frames`` or LTX's decode timestep, its decoder submodule never sees)."""
    calls: list[tuple[tuple[Any, ...], dict[str, Any]]] = []
    with scoped_hooks() as hooks:
        hooks.add_method_pre_hook(name, obj, method, _recorder(calls))
        yield calls
