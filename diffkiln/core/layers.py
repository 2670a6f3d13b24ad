"""Which layers of a model diffkiln can quantize: found by module type, never by name.

A quantizable layer is an ``nn.Linear``, ``nn.Conv1d``, ``nn.Conv2d`` or ``nn.Conv3d`` (or a
subclass that keeps the base class's ``forward``: a subclass that overrides it computes something
else, which an integer module would silently drop). Each has a *kind* that the Plan and the
bundle record: ``"linear"``, ``"conv1d"``, ``"conv"`` (2-D, the name plans have always used) and
``"conv3d"``.

Some layers of those types still have no integer form here; :func:`unsupported_reason` names why
(grouped convolutions, non-zero padding modes, 3-D dilation), and the planner keeps them in float
with that reason.
"""

from __future__ import annotations

from torch import nn

__all__ = [
    "CONV_KINDS",
    "LAYER_KINDS",
    "conv_padding",
    "find_quantizable_layers",
    "layer_kind",
    "unsupported_reason",
]

_KIND_OF_TYPE: dict[type[nn.Module], str] = {
    nn.Linear: "linear",
    nn.Conv1d: "conv1d",
    nn.Conv2d: "conv",
    nn.Conv3d: "conv3d",
}
LAYER_KINDS: tuple[str, ...] = tuple(_KIND_OF_TYPE.values())
"""Every layer kind a plan may hold."""
CONV_KINDS: tuple[str, ...] = ("conv1d", "conv", "conv3d")
"""The convolution kinds, by number of spatial dimensions (1, 2, 3)."""


def layer_kind(module: nn.Module) -> str | None:
    """The layer's kind (``"linear"``, ``"conv1d"``, ``"conv"``, ``"conv3d"``), or None when
    diffkiln does not quantize modules of its type.

    A subclass counts as its base type only when it keeps the base ``forward``.
    """
    for base, kind in _KIND_OF_TYPE.items():
        if isinstance(module, base) and type(module).forward is base.forward:
            return kind
    return None


def find_quantizable_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Every quantizable layer of ``model`` (see :func:`layer_kind`), by qualified name, in module order."""
    return {name: m for name, m in model.named_modules() if layer_kind(m) is not None}


def conv_padding(module: nn.Module) -> tuple[int, ...] | None:
    """The explicit zero padding per spatial dimension of a convolution, or None where the
    convolution pads unevenly (``padding="same"`` with an even kernel extent).

    ``padding="valid"`` is zero; ``padding="same"`` (stride 1 only, as torch requires) pads
    ``dilation * (kernel - 1) / 2`` on each side.
    """
    if not isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        raise TypeError(f"not a convolution: {type(module).__name__}")
    if not isinstance(module.padding, str):
        return tuple(int(p) for p in module.padding)
    if module.padding == "valid":
        return (0,) * len(module.kernel_size)
    total = [d * (k - 1) for d, k in zip(module.dilation, module.kernel_size, strict=True)]
    if any(t % 2 for t in total):
        return None
    return tuple(t // 2 for t in total)


def unsupported_reason(module: nn.Module) -> str | None:
    """Why a quantizable-type layer has no integer form here, or None when it has one."""
    kind = layer_kind(module)
    if kind is None:
        return f"{type(module).__name__} is not a quantizable layer type"
    if kind == "linear":
        return None
    assert isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d))  # narrows: every conv kind is one
    if module.groups != 1:
        return f"grouped convolution (groups={module.groups}) has no integer kernel here"
    if module.padding_mode != "zeros":
        return f"padding_mode {module.padding_mode!r} has no integer kernel here (zero padding only)"
    if conv_padding(module) is None:
        return "padding='same' with an even kernel extent pads unevenly; no integer kernel here"
    if kind == "conv3d" and any(d != 1 for d in module.dilation):
        return f"dilated 3-D convolution (dilation={tuple(module.dilation)}) has no integer kernel here"
    return None
