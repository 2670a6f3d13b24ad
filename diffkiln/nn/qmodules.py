"""Quantized modules that keep integer weights resident and compute with integer GEMMs.

Registered by the float module type they replace (``@register_qmodule(nn.Linear)``). Each is
built from frozen tensors (as stored in a bundle), never from float weights, so a deployment
needs no FP checkpoint. Tensor names per layer (``<layer>.<suffix>``):

Each is built as ``cls(tensors, meta)``: ``meta`` holds ``act_mode`` ("static"/"dynamic", or
None for weight-only layers whose activations stay in floating point), ``act_bits`` (8 or 7;
absent means 8), ``weight_bits``, ``weight_shape`` (the float weight's shape) and, for
convolutions, ``stride``, ``padding``, ``dilation`` and ``groups``.

* ``weight_q`` int8 (out, in[, kh, kw]) for 8- and 7-bit weights, or ``weight_packed`` uint8
  (out, ceil(in * kh * kw * bits / 8)) for 4-, 3- and 2-bit weights, which stay packed in memory
  and are unpacked to int8 inside each call; ``weight_scale`` float32 or float16 (out,);
  ``bias`` float32 or float16 (out,), optional;
* static activations: ``act_scale`` float32 (), ``act_zero_point`` int32 (); timestep-aware layers
  hold one per calibrated step, (T,), with ``act_timesteps`` float32 (T,);
* BOS-aware layers: ``bos_rows`` float32 (P, out), ``bos_positions`` int64 (P,), ``text_len`` int64 ();
* smoothed layers: ``smooth_inv`` float32 (in,), multiplied into the input before quantizing it;
* convolutions with a requantized output: ``output_scale`` float32 (), ``output_zero_point``
  int32 (): the float output is rounded onto this int8 grid (``QuantizeLinear ->
  DequantizeLinear``), as integer runtimes whose convolutions produce int8 compute it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from diffkiln.core.packing import check_group_mult
from diffkiln.kernels import (
    ActGrid,
    PackedWeights,
    StaticLinear,
    dynamic_quant,
    packed_quant_matmul,
    packed_weight_only_matmul,
    prepack_static_linear,
    quant_matmul,
    static_linear_packed,
    weight_only_matmul,
)

__all__ = ["IntGemm", "QLinear", "qmodule_for", "quantized_module_types", "register_qmodule"]

_QMODULES: dict[type[nn.Module], type[nn.Module]] = {}


def register_qmodule(float_type: type[nn.Module]) -> Callable[[type[nn.Module]], type[nn.Module]]:
    """Class decorator: register a quantized module as the replacement for ``float_type``."""

    def deco(cls: type[nn.Module]) -> type[nn.Module]:
        _QMODULES[float_type] = cls
        return cls

    return deco


def qmodule_for(float_type: type[nn.Module]) -> type[nn.Module]:
    """The quantized module class that replaces ``float_type``.

    Raises:
        KeyError: no registered replacement; the message lists the supported types.
    """
    if float_type not in _QMODULES:
        raise KeyError(
            f"no quantized module for {float_type.__name__}; supported: {sorted(t.__name__ for t in _QMODULES)}"
        )
    return _QMODULES[float_type]


def quantized_module_types() -> tuple[type[nn.Module], ...]:
    """Every registered quantized module class (for code that must leave them alone)."""
    return tuple(_QMODULES.values())


class IntGemm(nn.Module):
    """Shared integer GEMM of a (M, K) float input against resident integer weights.

    8-bit weights are held as int8 (K, N); 4-, 3- and 2-bit weights stay packed (N, bytes) and are
    unpacked to int8 per call, so resident memory is the packed size.
    """

    _PREPARED: tuple[str, ...] = ("_packed",)
    """The per-device caches of prepared kernels, emptied by a move (:meth:`_apply`)."""

    weight_t: torch.Tensor | None
    weight_packed: torch.Tensor | None
    weight_group_mult: torch.Tensor | None
    weight_scale: torch.Tensor
    act_scale: torch.Tensor
    act_zero_point: torch.Tensor
    bias: torch.Tensor | None
    smooth_inv: torch.Tensor | None
    act_timesteps: torch.Tensor | None

    def __init__(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        super().__init__()
        act_mode = meta.get("act_mode", "static")
        dynamic = act_mode == "dynamic"
        self.weight_only = act_mode is None
        self.weight_bits = int(meta.get("weight_bits") or 8)
        if "weight_packed" in tensors:
            packed = tensors["weight_packed"]
            if packed.dtype != torch.uint8:
                raise TypeError(f"weight_packed must be uint8, got {packed.dtype}")
            self.weight_shape = tuple(int(d) for d in meta["weight_shape"])
            self.register_buffer("weight_packed", packed.contiguous())
            self.register_buffer("weight_t", None)
            mult = tensors.get("weight_group_mult")
            self.group_size = None if mult is None else int(meta["group_size"])
            if mult is not None and self.group_size is not None:
                check_group_mult(mult, self.weight_shape[0], self.in_flat, self.group_size)
            self.register_buffer("weight_group_mult", mult)
        else:
            w = tensors["weight_q"]
            if w.dtype != torch.int8:
                raise TypeError(f"weight_q must be int8, got {w.dtype}")
            self.weight_shape = tuple(w.shape)
            # (K, N) contiguous: the layout torch._int_mm and npu_quant_matmul take for the weight.
            self.register_buffer("weight_t", w.reshape(w.shape[0], -1).t().contiguous())
            self.register_buffer("weight_packed", None)
            self.group_size = None
            self.register_buffer("weight_group_mult", None)
        self.dynamic = dynamic
        # Scales and bias stay in their stored dtype (float16 in mixed bundles: half the resident
        # bytes); each call widens them to float32, a copy of one row of N values.
        self.register_buffer("weight_scale", tensors["weight_scale"])
        bias = tensors.get("bias")
        self.register_buffer("bias", bias)
        smooth = tensors.get("smooth_inv")
        self.register_buffer("smooth_inv", None if smooth is None else smooth.to(torch.float32))
        self.register_buffer("act_timesteps", None)
        self.step_selector: Any = None  # set by diffkiln.nn.timestep.install_step_selector
        if not dynamic and not self.weight_only:
            bits = int(meta.get("act_bits") or 8)
            scales = tensors["act_scale"].to(torch.float32).reshape(-1)
            zps = tensors["act_zero_point"].to(torch.int32).reshape(-1)
            self.register_buffer("act_scale", scales if "act_timesteps" in tensors else scales.reshape(()))
            self.register_buffer("act_zero_point", zps if "act_timesteps" in tensors else zps.reshape(()))
            self.step_grids = [ActGrid(float(s), int(z), bits) for s, z in zip(scales, zps, strict=True)]
            self.act_grid = self.step_grids[0]
            if "act_timesteps" in tensors:
                self.register_buffer("act_timesteps", tensors["act_timesteps"].to(torch.float32))
        # Backend-specific prepacked weights (e.g. oneDNN's layout on x86), built on first use per device.
        self._packed: dict[str, StaticLinear] = {}
        # The prepared op that holds this layer's int8 codes once the portable buffer is released
        # (see _adopt_codes); None while ``weight_t`` holds them.
        self._codes_home: Any = None

    def _adopt_codes(self, prepared: Any) -> None:
        """Release the portable int8 codes when ``prepared`` holds the same values.

        oneDNN's prepacked weights are an int8 copy in its own layout; keeping ``weight_t`` beside
        it would make resident memory two bytes per 8-bit weight. The codes stay recoverable, bit
        for bit, from the prepacked copy (``codes_t``), for exports and other devices.
        """
        if self.weight_t is not None and getattr(prepared, "holds_codes", False):
            self._codes_home = prepared
            self.weight_t = None

    def _apply(self, fn: Any, recurse: bool = True) -> Any:
        # A move (``pipe.to("cuda")``, or a dtype change) first takes the int8 codes back from
        # the prepared kernels into ``weight_t``, so the move carries them; the prepared kernels
        # of the old placement (oneDNN's prepacked copy is CPU-only) are dropped and the new
        # placement prepares its own on first use.
        if self._codes_home is not None:
            self.weight_t = self._codes_home.codes_t().contiguous()
            self._codes_home = None
        for name in self._PREPARED:
            getattr(self, name).clear()
        return super()._apply(fn, recurse)

    def _current_grid(self) -> ActGrid:
        """This call's activation grid: the selected step's for timestep-aware layers."""
        if self.step_selector is None or len(self.step_grids) == 1:
            return self.act_grid
        return self.step_grids[self.step_selector.index]

    def format_name(self) -> str:
        """E.g. "W8A8 static", "W4A8 static (packed)", "W4A16 (weight-only, packed)"."""
        packed = ", packed" if self.weight_packed is not None else ""
        grouped = f", groups of {self.group_size}" if self.group_size else ""
        if self.weight_only:
            return f"W{self.weight_bits}A16 (weight-only{packed}{grouped})"
        bits = 8 if self.dynamic else self.act_grid.bits
        mode = "dynamic" if self.dynamic else "static"
        detail = f" ({(packed + grouped)[2:]})" if packed or grouped else ""
        return f"W{self.weight_bits}A{bits} {mode}{detail}"

    def codes_t(self) -> torch.Tensor:
        """The int8 (K, N) weight codes: the resident ones, or packed ones unpacked for this call."""
        if self.weight_t is not None:
            return self.weight_t
        if self._codes_home is not None:
            return self._codes_home.codes_t()
        return self._packed_weights().codes().t()

    def _packed_weights(self) -> PackedWeights:
        """This layer's resident packed weights (raises for 8-bit layers, which hold int8 codes)."""
        if self.weight_packed is None:
            raise RuntimeError("a quantized layer without packed weights")
        # Two-level groups: code x integer group multiplier is an int8 code on the per-channel
        # scale, so the same int8 GEMM runs with no float group scales in the kernel.
        mult, group = self.weight_group_mult, self.group_size
        return PackedWeights(self.weight_packed, self.weight_bits, self.in_flat, mult, group)

    @property
    def in_flat(self) -> int:
        """The flattened input width (in * kh * kw): the GEMM's K."""
        return math.prod(self.weight_shape[1:])

    @property
    def code_bits(self) -> int:
        """The width of the codes :meth:`codes_t` returns: 8 for two-level grouped layers (code x
        group multiplier), else the weight bits."""
        return 8 if self.group_size else self.weight_bits

    def scale_and_bias(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The weight scale and bias as float32 (they may be stored as float16)."""
        return self.weight_scale.float(), None if self.bias is None else self.bias.float()

    def gemm(self, x2d: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
        if self.smooth_inv is not None:
            x2d = x2d * self.smooth_inv  # the weights were multiplied by the inverse at export
        scale, bias = self.scale_and_bias()
        if self.weight_only and self.weight_packed is not None:
            out = packed_weight_only_matmul(x2d, self._packed_weights(), scale, bias)
        elif self.weight_only:
            out = weight_only_matmul(x2d, self.codes_t(), scale, bias, self.code_bits)
        elif self.dynamic:
            q, tok_scale = dynamic_quant(x2d)
            if self.weight_packed is not None:
                out = packed_quant_matmul(q, self._packed_weights(), scale, None, tok_scale, torch.float32)
            else:
                out = quant_matmul(q, self.codes_t(), scale, None, tok_scale, torch.float32)
            if bias is not None:
                out = out + bias
        elif self.weight_packed is not None:
            # No prepacking: a backend's prepacked form would hold an int8 copy of the weights.
            out = static_linear_packed(x2d, self._packed_weights(), scale, bias, self._current_grid())
        else:
            key = str(x2d.device)
            if key not in self._packed:
                codes = self.codes_t().to(x2d.device).t()
                self._packed[key] = prepack_static_linear(codes, scale, bias, self.act_grid, x2d.device)
                self._adopt_codes(self._packed[key])
            out = self._static_call(self._packed[key], x2d)
        return out.to(out_dtype)

    def _static_call(self, prepared: Any, x: torch.Tensor) -> torch.Tensor:
        """A prepared static kernel on this call's grid; a kernel that reads the step's grid from
        device memory (``call_step``) gets the selector's index tensor, with no host sync."""
        selector = self.step_selector
        if selector is not None and len(self.step_grids) > 1:
            step = selector.index_tensor
            if step is not None and hasattr(prepared, "call_step"):
                return prepared.call_step(x, self.step_grids, step)
        return prepared(x, self._current_grid())


@register_qmodule(nn.Linear)
class QLinear(IntGemm):
    """Integer Linear (W8A8, W4A8, W2A8, or weight-only W*A16), optional BOS rows precomputed in FP."""

    bos_rows: torch.Tensor | None
    bos_positions: torch.Tensor | None

    def __init__(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        super().__init__(tensors, meta)
        self.out_features, self.in_features = self.weight_shape[0], self.weight_shape[1]
        has_bos = "bos_rows" in tensors
        self.register_buffer("bos_rows", tensors["bos_rows"] if has_bos else None)  # stored dtype; cast per call
        self.register_buffer("bos_positions", tensors["bos_positions"].to(torch.int64) if has_bos else None)
        self.text_len = int(tensors["text_len"]) if has_bos else 0

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        # nn.Linear's and nn.Conv*'s argument name: some models call ``proj_in(input=x)``.
        x = input
        if self.bos_rows is not None and x.dim() == 3 and x.shape[1] == self.text_len:
            return self._forward_bos(x)
        out = self.gemm(x.reshape(-1, self.in_features), x.dtype)
        return out.reshape(*x.shape[:-1], self.out_features)

    def _forward_bos(self, x: torch.Tensor) -> torch.Tensor:
        if self.bos_rows is None or self.bos_positions is None:
            raise RuntimeError("this layer has no BOS rows")
        # The BOS rows are the same for every prompt: use the FP rows computed at export in place
        # of the integer GEMM's (whose range excludes the BOS outlier). Rows are quantised and
        # multiplied independently, so the GEMM runs on every row and the BOS rows are overwritten:
        # no gather of the other rows, and no data-dependent shape (which breaks torch.compile graphs).
        b, n, _ = x.shape
        out = self.gemm(x.reshape(-1, self.in_features), x.dtype).reshape(b, n, self.out_features)
        out[:, self.bos_positions, :] = self.bos_rows.to(x.dtype)
        return out

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, {self.format_name()}, bos={self.bos_rows is not None}"
