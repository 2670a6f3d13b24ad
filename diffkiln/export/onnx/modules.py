"""Export-time stand-ins for the runtime's quantized modules: the same integers, as QDQ custom ops.

Built from a loaded bundle's :class:`~diffkiln.nn.QLinear` / :class:`~diffkiln.nn.QConv` (codes,
scales, activation grid, smoothing, BOS rows), so an export needs only the bundle.
"""

from __future__ import annotations

import torch
from torch import nn

from diffkiln.core.errors import DiffkilnError
from diffkiln.export.onnx import ops
from diffkiln.export.onnx.nbits import to_matmulnbits
from diffkiln.nn import QConv, QConv1d, QLinear

__all__ = ["OnnxExportError", "OnnxQConv", "OnnxQLinear", "export_module_for"]


class OnnxExportError(DiffkilnError, ValueError):
    """A bundle cannot be expressed in ONNX; the message names the layer or component and the reason."""


def _check_exportable(name: str, q: QLinear | QConv) -> None:
    if q.dynamic:
        raise OnnxExportError(f"{name}: dynamic per-token activations have no static QDQ form; rebuild with static")
    if q.act_timesteps is not None:
        raise OnnxExportError(f"{name}: timestep-aware activation ranges are not exported yet; rebuild without them")


def _weight_buffers(
    module: nn.Module, name: str, q: QLinear | QConv, key: str, codes: torch.Tensor, float_activations: bool
) -> bool:
    """Register the int8 codes (as ``key``), per-channel scales and bias; return whether the stand-in
    keeps float activations (weight-only layers, or the ``float_activations`` fallback)."""
    if not float_activations:
        _check_exportable(name, q)
    scale, bias = q.scale_and_bias()
    module.register_buffer(key, codes.contiguous())
    module.register_buffer("w_scale", scale.contiguous())
    module.register_buffer("bias", bias if bias is not None else torch.zeros(scale.shape[0]))
    return q.weight_only or float_activations


def _act_buffers(module: nn.Module, q: QLinear | QConv, integer: bool) -> tuple[float, float] | None:
    """Register the activation grid's scale and zero point (and, for integer GEMMs, the combined
    output scale); return the 7-bit clip range, if any."""
    if module.weight_only:
        return None
    grid = q.act_grid
    module.register_buffer("a_scale", torch.tensor(grid.scale, dtype=torch.float32))
    module.register_buffer("a_zp", torch.tensor(grid.zero_point, dtype=torch.int8))
    if integer:
        # The same float32 product the runtime's kernels scale their int32 sums by.
        w_scale, _ = q.scale_and_bias()
        module.register_buffer("out_scale", (grid.scale * w_scale.to(torch.float32)).contiguous())
        module._buffers.pop("w_scale")  # folded into out_scale; not an initializer of its own
    # A 7-bit grid is an int8 grid clipped to [-64, 63]: a Clip before QuantizeLinear.
    if grid.bits == 8:
        return None
    return (grid.qmin - grid.zero_point) * grid.scale, (grid.qmax - grid.zero_point) * grid.scale


class OnnxQLinear(nn.Module):
    """A QLinear as ``diffkiln::qdq_linear`` (or ``wo_linear``), plus smoothing and BOS rows.

    Args:
        name: the layer's name, for errors.
        q: the runtime layer.
        float_activations: keep the activations in float (``wo_linear`` on the int8 weights):
            the fallback for activation formats without a static QDQ form. Default False.
        integer: compute with ``int_linear`` (MatMulInteger, int32 accumulation) instead of QDQ
            around a float MatMul. Default False.
        matmulnbits: store 4- and 2-bit weights for onnxruntime's ``com.microsoft.MatMulNBits``
            (``nbits_linear``; :mod:`diffkiln.export.onnx.nbits`) where their layout allows. Check
            :attr:`nbits` for whether this layer took it. Default False.
    """

    a_scale: torch.Tensor
    a_zp: torch.Tensor
    smooth_inv: torch.Tensor | None
    bos_keep: torch.Tensor | None
    bos_rows: torch.Tensor | None

    out_scale: torch.Tensor

    nbits_b: torch.Tensor
    nbits_scales: torch.Tensor
    bias: torch.Tensor

    def __init__(
        self, name: str, q: QLinear, float_activations: bool = False, integer: bool = False, matmulnbits: bool = False
    ):
        super().__init__()
        nbits = None
        if matmulnbits and q.weight_packed is not None:
            nbits = to_matmulnbits(q._packed_weights(), q.weight_scale)
        # MatMulNBits layers hold their codes in B; the int8 codes are not an initializer then.
        codes = q.codes_t() if nbits is None else torch.zeros(0, 0, dtype=torch.int8)
        self.weight_only = _weight_buffers(self, name, q, "w_t", codes, float_activations)
        self.nbits: tuple[int, int, int, int] | None = None  # (k, n, bits, block_size)
        if nbits is not None:
            b, scales, block = nbits
            self.register_buffer("nbits_b", b)
            self.register_buffer("nbits_scales", scales)
            self._buffers.pop("w_t")
            self._buffers.pop("w_scale")
            self.nbits = (q.in_flat, q.out_features, q.weight_bits, block)
        self.integer = integer and not self.weight_only and nbits is None
        self.register_buffer("smooth_inv", q.smooth_inv)
        self.act_clip = _act_buffers(self, q, self.integer)
        self.text_len = q.text_len
        self.register_buffer("bos_keep", None)
        self.register_buffer("bos_rows", None)
        self.bos_prefix = 0
        if q.bos_rows is not None and q.bos_positions is not None:
            positions = [int(p) for p in q.bos_positions]
            if positions == list(range(len(positions))):
                # CLIP's BOS (a prefix of positions): the rows as they are, concatenated before the
                # other tokens' outputs; nothing of text_len size is stored.
                self.bos_prefix = len(positions)
                self.bos_rows = q.bos_rows.float().unsqueeze(0)
            else:
                # Elsewhere: out * keep + rows, with keep 0 at the BOS positions.
                keep = torch.ones(q.text_len, 1)
                keep[positions] = 0.0
                rows = torch.zeros(q.text_len, q.out_features)
                rows[positions] = q.bos_rows.float()
                self.bos_keep, self.bos_rows = keep, rows

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        # nn.Linear's and nn.Conv*'s argument name: some models call ``proj_in(input=x)``.
        x = input
        xin = x if self.smooth_inv is None else x * self.smooth_inv
        if self.act_clip is not None:
            xin = xin.clamp(self.act_clip[0], self.act_clip[1])
        if self.nbits is not None:
            xd = xin if self.weight_only else ops.act_qdq(xin, self.a_scale, self.a_zp)
            out = ops.matmulnbits(xd, self.nbits_b, self.nbits_scales, *self.nbits) + self.bias
        elif self.weight_only:
            out = ops.wo_linear(xin, self.w_t, self.w_scale, self.bias)
        elif self.integer:
            out = ops.int_linear(xin, self.w_t, self.out_scale, self.bias, self.a_scale, self.a_zp)
        else:
            out = ops.qdq_linear(xin, self.w_t, self.w_scale, self.bias, self.a_scale, self.a_zp)
        if self.bos_rows is None or x.dim() != 3:
            return out
        if isinstance(x.shape[1], torch.SymInt):
            return self._bos_at_any_length(out, x.shape[1])
        if x.shape[1] != self.text_len:
            return out
        if self.bos_prefix:
            rows = self.bos_rows.expand(out.shape[0], -1, -1)
            return torch.cat([rows, out[:, self.bos_prefix :]], dim=1)
        assert self.bos_keep is not None  # set with bos_rows when the positions are no prefix
        return out * self.bos_keep + self.bos_rows

    def _bos_at_any_length(self, out: torch.Tensor, tokens: int) -> torch.Tensor:
        """The BOS rows where the token axis is symbolic (a dynamic export): applied where the
        call's length is the calibrated text length, as the runtime's layer does, decided in the
        graph. Comparing the symbolic length in Python would make torch.export guard on it: traced
        at the text length, the graph took that length only; traced at another, it never applied
        the rows, also at the text length."""
        assert self.bos_rows is not None
        pos = torch.arange(tokens, device=out.device)
        is_text = (pos[-1:] == self.text_len - 1)[:, None]  # (1, 1): the last position is the text's last
        if self.bos_prefix:
            keep = (pos >= self.bos_prefix)[:, None]
            rows = self.bos_rows[0][pos.clamp(max=self.bos_prefix - 1)]
        else:
            assert self.bos_keep is not None
            at = pos.clamp(max=self.text_len - 1)  # any index where the length is not the text's
            keep, rows = self.bos_keep[at] > 0, self.bos_rows[at]
        return torch.where(keep | ~is_text, out, rows.to(out.dtype))


class OnnxQConv(nn.Module):
    """A QConv1d/2d/3d as ``diffkiln::qdq_conv`` (or ``wo_conv``); arguments as :class:`OnnxQLinear`.

    A 1-D convolution runs, as in the runtime, as a 2-D one on a height-1 image (``Unsqueeze`` and
    ``Squeeze`` around the ``Conv``).

    A requantized output (``QConv2d.output_grid``) adds ``act_qdq`` on the output: onnxruntime
    then fuses input, weight and output QDQ into one QLinearConv. The output grid is written as
    uint8 with the zero point moved by 128 (the same grid: ``q_u8 = q_s8 + 128``), the type
    onnxruntime gives the convolution's input QDQ on x86; an int8 output whose QDQ feeds several
    nodes (UNet downsamplers: the next block and the skip connection) keeps int8 there, and a
    convolution whose input and output types differ is not fused.
    """

    a_scale: torch.Tensor
    a_zp: torch.Tensor
    out_scale: torch.Tensor
    bias: torch.Tensor
    o_scale: torch.Tensor
    o_zp: torch.Tensor

    def __init__(self, name: str, q: QConv, float_activations: bool = False, integer: bool = False):
        super().__init__()
        codes = q.codes_t().t().reshape(q.out_channels, q.in_channels, *q.kernel_size)
        self.weight_only = _weight_buffers(self, name, q, "w", codes, float_activations)
        self.integer = integer and not self.weight_only
        self.act_clip = _act_buffers(self, q, self.integer)
        self.height_one = isinstance(q, QConv1d)
        if self.integer:
            # Per output channel over NC...: (O, 1, ...) broadcasts against (N, O, ...).
            ones = [1] * len(q.kernel_size)
            self.out_scale = self.out_scale.view(-1, *ones)
            self.bias = self.bias.reshape(-1, *ones).contiguous()
        self.geometry = (list(q.stride), list(q.padding), list(q.dilation))
        self.requantize = q.output_grid is not None and not self.weight_only
        if q.output_grid is not None and self.requantize:
            self.register_buffer("o_scale", torch.tensor(q.output_grid.scale, dtype=torch.float32))
            self.register_buffer("o_zp", torch.tensor(q.output_grid.zero_point + 128, dtype=torch.uint8))

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        # nn.Linear's and nn.Conv*'s argument name: some models call ``proj_in(input=x)``.
        x = input
        out = self._conv(x.unsqueeze(2)).squeeze(2) if self.height_one else self._conv(x)
        return ops.act_qdq(out, self.o_scale, self.o_zp) if self.requantize else out

    def _conv(self, x: torch.Tensor) -> torch.Tensor:
        stride, padding, dilation = self.geometry
        if self.act_clip is not None:
            x = x.clamp(self.act_clip[0], self.act_clip[1])
        if self.weight_only:
            return ops.wo_conv(x, self.w, self.w_scale, self.bias, stride, padding, dilation)
        if self.integer:
            return ops.int_conv(x, self.w, self.out_scale, self.bias, self.a_scale, self.a_zp, stride, padding,
                                  dilation)  # fmt: skip
        return ops.qdq_conv(x, self.w, self.w_scale, self.bias, self.a_scale, self.a_zp, stride, padding, dilation)


def export_module_for(
    name: str, module: nn.Module, float_activations: bool = False, integer: bool = False, matmulnbits: bool = False
) -> nn.Module:
    """The export stand-in for a runtime quantized module.

    Args:
        name: the layer's name, for errors.
        module: the runtime Q-module.
        float_activations: keep the activations in float (see :class:`OnnxQLinear`). Default False.
        integer: integer GEMMs (MatMulInteger / ConvInteger) instead of QDQ. Default False.
        matmulnbits: 4- and 2-bit Linear weights as MatMulNBits (see :class:`OnnxQLinear`).
            Default False.

    Raises:
        OnnxExportError: the module's format cannot be expressed (the message says why).
    """
    if isinstance(module, QLinear):
        return OnnxQLinear(name, module, float_activations, integer, matmulnbits)
    if isinstance(module, QConv):
        return OnnxQConv(name, module, float_activations, integer)
    raise OnnxExportError(f"{name}: no ONNX form for {type(module).__name__}")
