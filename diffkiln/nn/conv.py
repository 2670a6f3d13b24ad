"""Integer convolutions: 1-D, 2-D and 3-D, built from frozen tensors like every Q-module.

* :class:`QConv2d`: a backend's direct integer convolution where it has an exact one (oneDNN on
  x86), else an integer GEMM over unfolded patches (im2col).
* :class:`QConv1d`: the same computation on a height-1 image: a (B, C, L) input runs as
  (B, C, 1, L) through the 2-D path, so it gets the same direct kernels.
* :class:`QConv3d`: an integer GEMM over 3-D patches (the input is zero-padded with real zeros,
  which quantize to the zero point exactly, then unfolded along time, height and width). No
  backend here has a direct exact 3-D integer convolution; patchify convolutions (kernel equal to
  stride, as in video transformers' patch embeddings) unfold without copying overlaps. Dilated
  3-D convolutions are kept in float by the planner.

Zero padding is exact in every path: a padded zero quantizes to the zero point, as a real zero does.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from diffkiln.kernels import ActGrid, ConvGeometry, StaticConv, prepack_static_conv, static_conv_unpacked
from diffkiln.nn.qmodules import IntGemm, register_qmodule

__all__ = ["QConv", "QConv1d", "QConv2d", "QConv3d", "requantize"]


def requantize(y: torch.Tensor, grid: ActGrid) -> torch.Tensor:
    """``y`` rounded onto ``grid`` and back: ONNX's ``QuantizeLinear -> DequantizeLinear`` (round
    half to even, saturate), computed in float32 and returned in ``y``'s dtype."""
    yf = y.to(torch.float32)
    q = torch.clamp(torch.round(yf / grid.scale) + grid.zero_point, grid.qmin, grid.qmax)
    return ((q - grid.zero_point) * grid.scale).to(y.dtype)


class QConv(IntGemm):
    """Shared part of the integer convolutions: geometry, the optional requantized output."""

    def __init__(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        super().__init__(tensors, meta)
        self.out_channels, self.in_channels = self.weight_shape[0], self.weight_shape[1]
        self.kernel_size = tuple(self.weight_shape[2:])
        self.stride = tuple(meta["stride"])
        self.padding = tuple(meta["padding"])
        self.dilation = tuple(meta["dilation"])
        if meta.get("groups", 1) != 1:
            raise ValueError("grouped convolutions are not quantized; keep this layer in FP with --exclude")
        has_output = "output_scale" in tensors
        self.output_grid = (
            ActGrid(float(tensors["output_scale"]), int(tensors["output_zero_point"]), 8) if has_output else None
        )

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        # nn.Linear's and nn.Conv*'s argument name: some models call ``proj_in(input=x)``.
        x = input
        out = self._conv(x)
        return out if self.output_grid is None else requantize(out, self.output_grid)

    def _conv(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _dequantized_weight(self) -> torch.Tensor:
        k = self.codes_t().t().reshape(self.out_channels, self.in_channels, *self.kernel_size)
        scale, _ = self.scale_and_bias()
        return k.to(torch.float32) * scale.view(-1, *([1] * (k.dim() - 1)))

    def extra_repr(self) -> str:
        requant = ", output requantized to int8" if self.output_grid is not None else ""
        return f"{self.in_channels}->{self.out_channels}, kernel={self.kernel_size}, {self.format_name()}{requant}"


@register_qmodule(nn.Conv2d)
class QConv2d(QConv):
    """Integer 2-D convolution: a backend's direct kernel, or im2col + integer GEMM."""

    _PREPARED = ("_packed", "_direct")

    def __init__(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        super().__init__(tensors, meta)
        # A backend's direct integer convolution (oneDNN on x86), per device; None: im2col + GEMM.
        self._direct: dict[str, StaticConv | None] = {}

    def _geometry(self) -> ConvGeometry:
        return ConvGeometry(self.stride, self.padding, self.dilation)

    def _direct_conv(self, device: torch.device) -> StaticConv | None:
        key = str(device)
        if key not in self._direct:
            conv = None
            if not self.dynamic and not self.weight_only and self.weight_packed is None:
                w = self.codes_t().to(device).t().reshape(self.out_channels, self.in_channels, *self.kernel_size)
                scale, bias = self.scale_and_bias()
                conv = prepack_static_conv(w, scale, bias, self.act_grid, self._geometry(), device)
                if conv is not None:
                    self._adopt_codes(conv)
            self._direct[key] = conv
        return self._direct[key]

    def _conv(self, x: torch.Tensor) -> torch.Tensor:
        direct = self._direct_conv(x.device)
        if direct is not None:
            return self._static_call(direct, x).to(x.dtype)
        if self.weight_only and x.device.type in ("cpu", "cuda"):
            # The float convolution on weights dequantized for this call (no im2col); the
            # resident copy stays packed. NPUs take im2col + npu_weight_quant_batchmatmul below.
            _, bias = self.scale_and_bias()
            out = F.conv2d(x.to(torch.float32), self._dequantized_weight(), bias, self.stride, self.padding,
                           self.dilation)  # fmt: skip
            return out.to(x.dtype)
        if self.weight_packed is not None and not self.dynamic and not self.weight_only:
            codes = self.codes_t().t().reshape(self.out_channels, self.in_channels, *self.kernel_size)
            scale, bias = self.scale_and_bias()
            direct_out = static_conv_unpacked(x, codes, scale, bias, self._current_grid(), self._geometry())
            if direct_out is not None:
                return direct_out.to(x.dtype)
        b, _, h, w = x.shape
        cols = F.unfold(x, self.kernel_size, dilation=self.dilation, padding=self.padding, stride=self.stride)
        kh, kw = self.kernel_size
        oh = (h + 2 * self.padding[0] - self.dilation[0] * (kh - 1) - 1) // self.stride[0] + 1
        ow = (w + 2 * self.padding[1] - self.dilation[1] * (kw - 1) - 1) // self.stride[1] + 1
        out = self.gemm(cols.transpose(1, 2).reshape(-1, cols.shape[1]), x.dtype)
        return out.reshape(b, oh * ow, self.out_channels).transpose(1, 2).reshape(b, self.out_channels, oh, ow)


@register_qmodule(nn.Conv1d)
class QConv1d(QConv2d):
    """Integer 1-D convolution, computed as a 2-D convolution of a height-1 image."""

    def __init__(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        super().__init__(tensors, meta)
        # The flattened codes of an (O, I, k) kernel are those of an (O, I, 1, k) one.
        self.length_kernel = self.kernel_size
        self.kernel_size = (1, *self.kernel_size)
        self.stride = (1, *self.stride)
        self.padding = (0, *self.padding)
        self.dilation = (1, *self.dilation)

    def _conv(self, x: torch.Tensor) -> torch.Tensor:
        return super()._conv(x.unsqueeze(2)).squeeze(2)

    def extra_repr(self) -> str:
        return f"{self.in_channels}->{self.out_channels}, kernel={self.length_kernel}, {self.format_name()}"


@register_qmodule(nn.Conv3d)
class QConv3d(QConv):
    """Integer 3-D convolution: 3-D patches unfolded, then the integer GEMM (no dilation)."""

    def __init__(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        super().__init__(tensors, meta)
        if any(d != 1 for d in self.dilation):
            raise ValueError("dilated 3-D convolutions are not quantized; keep this layer in FP with --exclude")

    def _conv(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight_only and x.device.type in ("cpu", "cuda"):
            _, bias = self.scale_and_bias()
            out = F.conv3d(x.to(torch.float32), self._dequantized_weight(), bias, self.stride, self.padding)
            return out.to(x.dtype)
        pt, ph, pw = self.padding
        if any(self.padding):
            x = F.pad(x, (pw, pw, ph, ph, pt, pt))
        (kt, kh, kw), (st, sh, sw) = self.kernel_size, self.stride
        patches = x.unfold(2, kt, st).unfold(3, kh, sh).unfold(4, kw, sw)  # (B, C, T', H', W', kt, kh, kw)
        b, c, t, h, w = patches.shape[:5]
        cols = patches.permute(0, 2, 3, 4, 1, 5, 6, 7).reshape(b * t * h * w, c * kt * kh * kw)
        out = self.gemm(cols, x.dtype)
        return out.reshape(b, t, h, w, self.out_channels).permute(0, 4, 1, 2, 3).contiguous()
