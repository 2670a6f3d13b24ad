"""Check a bundle's quantized-layer tensors and metadata before any module or kernel sees them.

A bundle is untrusted: a scale shorter than the output channels makes oneDNN read past its buffer,
a stride of 0 divides by zero in a convolution, ``act_bits`` of 1e308 hangs the first forward, and
a NaN, zero or negative scale or an out-of-grid zero point silently changes every output. Each rule
below is checked for every layer (``check_layer``), and a float tensor of the denoiser must be
finite (``check_float_tensor``). A broken rule raises :class:`~diffkiln.core.errors.BundleError`
naming the layer, the tensor or field, and the rule.

Rules, per layer (``O`` output channels, ``K`` the flattened input width, ``T`` calibrated steps):

* ``kind`` one of the quantizable kinds; ``weight_bits`` in {2, 3, 4, 7, 8}; ``act_mode`` "static",
  "dynamic" or None (weight-only); ``act_bits`` 7 or 8; ``weight_shape`` positive ints, 2 of them
  for a linear layer and 3 to 5 for a 1-D to 3-D convolution; ``group_size`` None or a positive
  int dividing ``K``;
* convolutions: ``stride`` and ``dilation`` >= 1, ``padding`` >= 0, one per spatial axis; ``groups`` 1;
* ``weight_q`` int8 of ``weight_shape`` (7- and 8-bit layers; 7-bit codes within [-64, 63]), or
  ``weight_packed`` uint8 ``(O, ceil(K * bits / 8))`` (2-, 3-, 4-bit layers);
* ``weight_scale`` float ``(O,)``, finite and > 0; ``bias`` float ``(O,)``, finite;
* static activations: ``act_scale`` float, () or (T,), finite and > 0; ``act_zero_point`` an
  integer tensor of the same size inside the ``act_bits`` grid; ``act_timesteps`` float (T,), finite;
* ``smooth_inv`` float, 1-D, finite and > 0; ``bos_rows`` float ``(P, O)`` finite with
  ``bos_positions`` integers ``(P,)`` in ``[0, text_len)`` and ``text_len`` a positive scalar;
* ``output_scale`` float (), finite and > 0, with ``output_zero_point`` inside the int8 grid;
* no other tensor names.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from diffkiln.core.errors import BundleError

__all__ = ["check_float_tensor", "check_layer", "check_layers"]

_KINDS = {"linear": 2, "conv1d": 3, "conv": 4, "conv3d": 5}
_WEIGHT_BITS = {2, 3, 4, 7, 8}
_KNOWN = {"weight_q", "weight_packed", "weight_group_mult", "weight_scale", "bias", "act_scale", "act_zero_point",
          "act_timesteps", "smooth_inv", "bos_rows", "bos_positions", "text_len", "output_scale",
          "output_zero_point"}  # fmt: skip


def _fail(layer: str, what: str, rule: str) -> BundleError:
    return BundleError(f"layer {layer}: {what} {rule}")


def _int(value: Any, layer: str, field: str, low: int, high: int | None = None) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < low or (high is not None and value > high):
        bound = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise _fail(layer, f"meta.{field}", f"must be an integer {bound}, got {value!r}")
    return value


def _float_tensor(t: torch.Tensor, layer: str, name: str, shape: tuple[int, ...] | None, positive: bool) -> None:
    if not t.is_floating_point():
        raise _fail(layer, name, f"must be a float tensor, got {t.dtype}")
    if shape is not None and tuple(t.shape) != shape:
        raise _fail(layer, name, f"must have shape {list(shape)}, got {list(t.shape)}")
    values = t.float()
    if not bool(torch.isfinite(values).all()):
        raise _fail(layer, name, "holds NaN or infinite values")
    if positive and bool((values <= 0).any()):
        raise _fail(layer, name, "must be > 0 everywhere (a zero or negative scale)")


def _grid_ints(t: torch.Tensor, layer: str, name: str, bits: int, numel: int) -> None:
    if t.is_floating_point() or t.dtype == torch.bool or t.numel() != numel:
        raise _fail(layer, name, f"must be {numel} integer value(s), got {t.dtype} {list(t.shape)}")
    low, high = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    if t.numel() and (int(t.min()) < low or int(t.max()) > high):
        raise _fail(layer, name, f"must lie inside the {bits}-bit grid [{low}, {high}]")


def _check_meta(layer: str, meta: Any) -> tuple[tuple[int, ...], int]:
    if not isinstance(meta, dict):
        raise _fail(layer, "meta", "must be an object")
    kind = meta.get("kind")
    if kind not in _KINDS:
        raise _fail(layer, "meta.kind", f"must be one of {sorted(_KINDS)}, got {kind!r}")
    bits = meta.get("weight_bits", 8) or 8
    if bits not in _WEIGHT_BITS or isinstance(bits, bool):
        raise _fail(layer, "meta.weight_bits", f"must be one of {sorted(_WEIGHT_BITS)}, got {bits!r}")
    if meta.get("act_mode", "static") not in ("static", "dynamic", None):
        raise _fail(layer, "meta.act_mode", f"must be 'static', 'dynamic' or null, got {meta.get('act_mode')!r}")
    if meta.get("act_bits") is not None:
        _int(meta["act_bits"], layer, "act_bits", 7, 8)
    shape = meta.get("weight_shape")
    if not isinstance(shape, list) or len(shape) != _KINDS[kind]:
        raise _fail(layer, "meta.weight_shape", f"must list {_KINDS[kind]} dimensions for a {kind} layer")
    dims = tuple(_int(d, layer, "weight_shape", 1, 1 << 20) for d in shape)
    k = math.prod(dims[1:])
    if meta.get("group_size") is not None:
        group = _int(meta["group_size"], layer, "group_size", 1)
        if k % group:
            raise _fail(layer, "meta.group_size", f"must divide the input width {k}, got {group}")
    if kind != "linear":
        axes = len(dims) - 2
        for field, low in (("stride", 1), ("dilation", 1), ("padding", 0)):
            value = meta.get(field)
            if not isinstance(value, list) or len(value) != axes:
                raise _fail(layer, f"meta.{field}", f"must list {axes} integer(s), one per spatial axis")
            for v in value:
                _int(v, layer, field, low, 1 << 16)
        if meta.get("groups", 1) != 1:
            raise _fail(layer, "meta.groups", "must be 1 (grouped convolutions are not quantized)")
    return dims, int(bits)


def check_layer(layer: str, tensors: dict[str, torch.Tensor], meta: Any) -> None:
    """Check one quantized layer's tensors against its metadata (see the module docstring).

    Raises:
        BundleError: the layer, the tensor or field, and the rule it breaks.
    """
    dims, bits = _check_meta(layer, meta)
    unknown = sorted(set(tensors) - _KNOWN)
    if unknown:
        raise _fail(layer, "tensors", f"holds unknown tensors {unknown}")
    out, k = dims[0], math.prod(dims[1:])
    if bits >= 7:
        w = tensors.get("weight_q")
        if w is None or w.dtype != torch.int8 or tuple(w.shape) != dims:
            raise _fail(layer, "weight_q", f"must be int8 of shape {list(dims)} for {bits}-bit weights")
        if bits == 7 and w.numel() and (int(w.min()) < -64 or int(w.max()) > 63):
            raise _fail(layer, "weight_q", "must lie inside the 7-bit grid [-64, 63]")
    else:
        p = tensors.get("weight_packed")
        row = math.ceil(k * bits / 8)
        if p is None or p.dtype != torch.uint8 or tuple(p.shape) != (out, row):
            raise _fail(layer, "weight_packed", f"must be uint8 of shape [{out}, {row}] for {bits}-bit weights")
    if "weight_scale" not in tensors:
        raise _fail(layer, "weight_scale", "is missing")
    _float_tensor(tensors["weight_scale"], layer, "weight_scale", (out,), positive=True)
    if "bias" in tensors:
        _float_tensor(tensors["bias"], layer, "bias", (out,), positive=False)
    if meta.get("act_mode", "static") == "static":
        act_bits = meta.get("act_bits") or 8
        if "act_scale" not in tensors or "act_zero_point" not in tensors:
            raise _fail(layer, "act_scale", "and act_zero_point are required for static activations")
        scale = tensors["act_scale"]
        steps = scale.numel()
        if scale.dim() > 1 or steps < 1:
            raise _fail(layer, "act_scale", "must be a scalar or one value per calibrated step")
        _float_tensor(scale, layer, "act_scale", None, positive=True)
        _grid_ints(tensors["act_zero_point"], layer, "act_zero_point", act_bits, steps)
        if "act_timesteps" in tensors:
            _float_tensor(tensors["act_timesteps"], layer, "act_timesteps", (steps,), positive=False)
        elif steps != 1:
            raise _fail(layer, "act_scale", "has one value per step but the layer has no act_timesteps")
    if "smooth_inv" in tensors:
        s = tensors["smooth_inv"]
        if s.dim() != 1:
            raise _fail(layer, "smooth_inv", "must be one factor per input channel (1-D)")
        _float_tensor(s, layer, "smooth_inv", None, positive=True)
    if ("bos_positions" in tensors or "text_len" in tensors) and "bos_rows" not in tensors:
        raise _fail(layer, "bos_rows", "is missing while bos_positions or text_len are present")
    if "bos_rows" in tensors:
        positions, text_len = tensors.get("bos_positions"), tensors.get("text_len")
        if positions is None or text_len is None or text_len.numel() != 1 or text_len.is_floating_point():
            raise _fail(layer, "bos_rows", "need bos_positions and an integer text_len")
        n = _int(int(text_len), layer, "text_len", 1, 1 << 20)
        _float_tensor(tensors["bos_rows"], layer, "bos_rows", (positions.numel(), out), positive=False)
        if positions.is_floating_point() or positions.dim() != 1 or (
                positions.numel() and (int(positions.min()) < 0 or int(positions.max()) >= n)):  # fmt: skip
            raise _fail(layer, "bos_positions", f"must be integer positions in [0, {n})")
    if "output_scale" in tensors:
        _float_tensor(tensors["output_scale"], layer, "output_scale", None, positive=True)
        if tensors["output_scale"].numel() != 1 or "output_zero_point" not in tensors:
            raise _fail(layer, "output_scale", "must be one value, with output_zero_point")
        _grid_ints(tensors["output_zero_point"], layer, "output_zero_point", 8, 1)


def check_float_tensor(name: str, t: torch.Tensor) -> None:
    """A float tensor of the denoiser must be finite.

    Raises:
        BundleError: it holds NaN or infinite values.
    """
    if t.is_floating_point() and not bool(torch.isfinite(t).all()):
        raise BundleError(f"denoiser tensor {name} holds NaN or infinite values")


_GEOMETRY = {"linear": nn.Linear, "conv1d": nn.Conv1d, "conv": nn.Conv2d, "conv3d": nn.Conv3d}


def check_layers(model: nn.Module, tensors: dict[str, dict[str, torch.Tensor]], metas: dict[str, Any]) -> None:
    """:func:`check_layer` for every layer, and each one against the model it goes into: a layer of
    that name and type, with the same weight shape and (convolutions) stride, padding and dilation,
    so a bundle that loads also runs.

    Raises:
        BundleError: the first layer that breaks a rule.
    """
    modules = dict(model.named_modules())
    for name, layer_tensors in tensors.items():
        meta = metas.get(name)
        check_layer(name, layer_tensors, meta)
        assert isinstance(meta, dict)
        target = modules.get(name)
        if target is None or type(target) is not _GEOMETRY[meta["kind"]]:
            raise _fail(name, "meta.kind", f"{meta['kind']} does not match the model's layer "
                                           f"({type(target).__name__ if target is not None else 'none'})")  # fmt: skip
        weight = getattr(target, "weight", None)
        if isinstance(weight, torch.Tensor) and list(weight.shape) != meta["weight_shape"]:
            raise _fail(name, "meta.weight_shape", f"{meta['weight_shape']} is not the model's {list(weight.shape)}")
        for field in ("stride", "padding", "dilation"):
            own = getattr(target, field, None)
            # A padding given as a string ("same") is resolved by the writer; nothing to compare.
            if meta["kind"] != "linear" and not isinstance(own, str) and list(own or ()) != meta[field]:
                raise _fail(name, f"meta.{field}", f"{meta[field]} is not the model's {own}")
