"""Torch custom ops for quantized layers, and their ONNX translations (QDQ around MatMul / Conv).

Each op computes in float exactly what the ONNX graph computes, so the traced model runs; the
exporter replaces it by its onnxscript translation:

* ``qdq_linear``: ``QuantizeLinear -> DequantizeLinear`` on the activation (static per-tensor
  grid), ``DequantizeLinear`` (per output channel) on the int8 weight initializer, ``MatMul``, ``Add``;
* ``qdq_conv``: the same around ``Conv``;
* ``wo_linear`` / ``wo_conv``: weight-only layers, ``DequantizeLinear`` on the weight only;
* ``int_linear`` / ``int_conv`` (``compute="integer"``): ``QuantizeLinear`` on the activation,
  then ``MatMulInteger`` / ``ConvInteger`` on the int8 codes (int32 accumulation, exact, as the
  runtime's kernels), ``Cast`` to float, one ``Mul`` by the combined scale (activation scale x
  weight scale, per output channel) and ``Add`` of the bias: the runtime's arithmetic step by step,
  where QDQ's float MatMul rounds differently;
* ``matmulnbits=True``: 4- and 2-bit Linear weights as onnxruntime's ``com.microsoft.MatMulNBits``
  (packed unsigned codes in blocks along K, one float scale per block; :func:`matmulnbits`),
  after ``act_qdq``, the activation's QDQ alone: the form onnxruntime's low-bit kernels take.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from onnxscript import opset20 as op
from torch import Tensor

from diffkiln.export.onnx.nbits import nbits_dequantize

__all__ = ["TRANSLATIONS", "matmulnbits"]


def _fake_quant(x: Tensor, a_scale: Tensor, a_zp: Tensor) -> Tensor:
    """QuantizeLinear -> DequantizeLinear; the zero point's dtype (int8 or uint8) sets the codes."""
    zp = a_zp.to(torch.float32)
    lo, hi = (0, 255) if a_zp.dtype == torch.uint8 else (-128, 127)
    q = torch.clamp(torch.round(x / a_scale) + zp, lo, hi)
    return (q - zp) * a_scale


def _linear_out(x: Tensor, w_t: Tensor) -> Tensor:
    """An empty tensor of a linear op's output shape (the custom ops' fake kernels). Checks the
    input features against the weight's, as ``torch.matmul`` does: torch.export then knows the
    feature axis is fixed (without it, a dynamic export left that axis a free symbol, and the
    manifest an axis no size but the weight's can take)."""
    torch._check(x.shape[-1] == w_t.shape[0], lambda: f"input features {x.shape[-1]}, the weight takes {w_t.shape[0]}")
    return x.new_empty(*x.shape[:-1], w_t.shape[1])


@torch.library.custom_op("diffkiln::qdq_linear", mutates_args=())
def qdq_linear(x: Tensor, w_t: Tensor, w_scale: Tensor, bias: Tensor, a_scale: Tensor, a_zp: Tensor) -> Tensor:
    """Static W8A8 linear: fake-quantized x against int8 (K, N) weights with per-column scales."""
    return _fake_quant(x, a_scale, a_zp) @ (w_t.to(torch.float32) * w_scale) + bias


@qdq_linear.register_fake
def _(x: Tensor, w_t: Tensor, w_scale: Tensor, bias: Tensor, a_scale: Tensor, a_zp: Tensor) -> Tensor:
    return _linear_out(x, w_t)


@torch.library.custom_op("diffkiln::wo_linear", mutates_args=())
def wo_linear(x: Tensor, w_t: Tensor, w_scale: Tensor, bias: Tensor) -> Tensor:
    """Weight-only linear: float x against dequantized int8 (K, N) weights."""
    return x @ (w_t.to(torch.float32) * w_scale) + bias


@wo_linear.register_fake
def _(x: Tensor, w_t: Tensor, w_scale: Tensor, bias: Tensor) -> Tensor:
    return _linear_out(x, w_t)


_CONV = {3: torch.nn.functional.conv1d, 4: torch.nn.functional.conv2d, 5: torch.nn.functional.conv3d}


def _convnd(x: Tensor, w: Tensor, bias: Tensor | None, stride: list[int], padding: list[int],
            dilation: list[int]) -> Tensor:  # fmt: skip
    """The float 1-, 2- or 3-D convolution (by the weight's rank)."""
    return _CONV[w.dim()](x, w, bias, stride, padding, dilation)


def _per_out(scale: Tensor, w: Tensor) -> Tensor:
    """A per-output-channel vector shaped to broadcast against the weight ``w``."""
    return scale.view(-1, *([1] * (w.dim() - 1)))


def _conv_out_like(x: Tensor, w: Tensor, stride: list[int], padding: list[int], dilation: list[int]) -> Tensor:
    """An empty tensor of the convolution's output shape (the custom ops' fake kernels), from the
    sizes alone. Checks the input channels against the weight's, as a convolution does, so that
    torch.export pins that axis. A meta convolution gives the same shape, but its memory-format
    checks reason symbolically about every stride of a dynamic export."""
    torch._check(x.shape[1] == w.shape[1], lambda: f"input channels {x.shape[1]}, the weight takes {w.shape[1]}")
    spatial = [
        (size + 2 * pad - dil * (k - 1) - 1) // st + 1
        for size, k, st, pad, dil in zip(x.shape[2:], w.shape[2:], stride, padding, dilation, strict=True)
    ]
    return x.new_empty((x.shape[0], w.shape[0], *spatial))


@torch.library.custom_op("diffkiln::qdq_conv", mutates_args=())
def qdq_conv(
    x: Tensor,
    w: Tensor,
    w_scale: Tensor,
    bias: Tensor,
    a_scale: Tensor,
    a_zp: Tensor,
    stride: list[int],
    padding: list[int],
    dilation: list[int],
) -> Tensor:
    """Static W8A8 convolution (1-, 2- or 3-D): fake-quantized x against int8 (O, I, *kernel) weights."""
    wf = w.to(torch.float32) * _per_out(w_scale, w)
    return _convnd(_fake_quant(x, a_scale, a_zp), wf, bias, stride, padding, dilation)


@qdq_conv.register_fake
def _(x, w, w_scale, bias, a_scale, a_zp, stride, padding, dilation):
    return _conv_out_like(x, w, stride, padding, dilation)


@torch.library.custom_op("diffkiln::wo_conv", mutates_args=())
def wo_conv(
    x: Tensor, w: Tensor, w_scale: Tensor, bias: Tensor, stride: list[int], padding: list[int], dilation: list[int]
) -> Tensor:
    """Weight-only convolution (1-, 2- or 3-D): float x against dequantized int8 weights."""
    wf = w.to(torch.float32) * _per_out(w_scale, w)
    return _convnd(x, wf, bias, stride, padding, dilation)


@wo_conv.register_fake
def _(x, w, w_scale, bias, stride, padding, dilation):
    return _conv_out_like(x, w, stride, padding, dilation)


@torch.library.custom_op("diffkiln::act_qdq", mutates_args=())
def act_qdq(x: Tensor, a_scale: Tensor, a_zp: Tensor) -> Tensor:
    """The static activation grid alone (``QuantizeLinear -> DequantizeLinear``), for layers whose
    GEMM is another node (MatMulNBits)."""
    return _fake_quant(x, a_scale, a_zp)


@act_qdq.register_fake
def _(x: Tensor, a_scale: Tensor, a_zp: Tensor) -> Tensor:
    return torch.empty_like(x)


def matmulnbits(x: Tensor, b: Tensor, scales: Tensor, k: int, n: int, bits: int, block_size: int) -> Tensor:
    """``x @ W^T`` for the MatMulNBits weight ``(b, scales)``: the contrib node while exporting
    (``torch.onnx.ops.symbolic``), the dequantized float op otherwise.

    accuracy_level 0 (unset): onnxruntime computes in float on the dequantized blocks, as
    DequantizeLinear + MatMul does; level 4 would re-quantize the activations to int8 per block,
    off the QDQ grid.
    """
    if torch.onnx.is_in_onnx_export():
        torch._check(x.shape[-1] == k, lambda: f"input features {x.shape[-1]}, the weight takes {k}")
        attrs: dict[str, Any] = {"K": k, "N": n, "bits": bits, "block_size": block_size, "accuracy_level": 0}
        return torch.onnx.ops.symbolic(
            "com.microsoft::MatMulNBits", (x, b, scales), attrs, dtype=x.dtype, shape=(*x.shape[:-1], n), version=1
        )
    return x @ nbits_dequantize(b, scales, k, bits).t()


def _int_codes(x: Tensor, a_scale: Tensor, a_zp: Tensor) -> Tensor:
    """The activation codes minus the zero point, in float64 (exact for any int8 GEMM we export)."""
    zp = a_zp.to(torch.float64)
    return torch.clamp(torch.round(x / a_scale).to(torch.float64) + zp, -128, 127) - zp


@torch.library.custom_op("diffkiln::int_linear", mutates_args=())
def int_linear(x: Tensor, w_t: Tensor, out_scale: Tensor, bias: Tensor, a_scale: Tensor, a_zp: Tensor) -> Tensor:
    """Static W8A8 linear with integer accumulation: ``float(sum (q - z) w) * out_scale + bias``."""
    acc = (_int_codes(x, a_scale, a_zp) @ w_t.to(torch.float64)).to(torch.int32)
    return acc.to(torch.float32) * out_scale + bias


@int_linear.register_fake
def _(x: Tensor, w_t: Tensor, out_scale: Tensor, bias: Tensor, a_scale: Tensor, a_zp: Tensor) -> Tensor:
    return _linear_out(x, w_t)


@torch.library.custom_op("diffkiln::int_conv", mutates_args=())
def int_conv(
    x: Tensor,
    w: Tensor,
    out_scale: Tensor,
    bias: Tensor,
    a_scale: Tensor,
    a_zp: Tensor,
    stride: list[int],
    padding: list[int],
    dilation: list[int],
) -> Tensor:
    """Static W8A8 convolution with integer accumulation; ``out_scale`` and ``bias`` are (O, 1, ...).

    Zero padding is the zero point's code, as ONNX ConvInteger pads (a real zero's code).
    """
    q = _int_codes(x, a_scale, a_zp)
    acc = _convnd(q, w.to(torch.float64), None, stride, padding, dilation).to(torch.int32)
    return acc.to(torch.float32) * out_scale + bias


@int_conv.register_fake
def _(x, w, out_scale, bias, a_scale, a_zp, stride, padding, dilation):
    return _conv_out_like(x, w, stride, padding, dilation)


def _qdq_linear_onnx(x: Any, w_t: Any, w_scale: Any, bias: Any, a_scale: Any, a_zp: Any) -> Any:
    xd = op.DequantizeLinear(op.QuantizeLinear(x, a_scale, a_zp), a_scale, a_zp)
    return op.Add(op.MatMul(xd, op.DequantizeLinear(w_t, w_scale, axis=1)), bias)


def _wo_linear_onnx(x: Any, w_t: Any, w_scale: Any, bias: Any) -> Any:
    return op.Add(op.MatMul(x, op.DequantizeLinear(w_t, w_scale, axis=1)), bias)


def _conv_attrs(stride: list[int], padding: list[int], dilation: list[int]) -> dict[str, Any]:
    return {"strides": stride, "pads": [*padding, *padding], "dilations": dilation}


def _qdq_conv_onnx(x: Any, w: Any, w_scale: Any, bias: Any, a_scale: Any, a_zp: Any, stride: list[int],
                     padding: list[int], dilation: list[int]) -> Any:  # fmt: skip
    xd = op.DequantizeLinear(op.QuantizeLinear(x, a_scale, a_zp), a_scale, a_zp)
    wd = op.DequantizeLinear(w, w_scale, axis=0)
    return op.Conv(xd, wd, bias, **_conv_attrs(stride, padding, dilation))


def _wo_conv_onnx(x: Any, w: Any, w_scale: Any, bias: Any, stride: list[int], padding: list[int],
                    dilation: list[int]) -> Any:  # fmt: skip
    wd = op.DequantizeLinear(w, w_scale, axis=0)
    return op.Conv(x, wd, bias, **_conv_attrs(stride, padding, dilation))


def _int_linear_onnx(x: Any, w_t: Any, out_scale: Any, bias: Any, a_scale: Any, a_zp: Any) -> Any:
    acc = op.MatMulInteger(op.QuantizeLinear(x, a_scale, a_zp), w_t, a_zp)
    return op.Add(op.Mul(op.Cast(acc, to=1), out_scale), bias)  # to=1: FLOAT


def _int_conv_onnx(x: Any, w: Any, out_scale: Any, bias: Any, a_scale: Any, a_zp: Any, stride: list[int],
                     padding: list[int], dilation: list[int]) -> Any:  # fmt: skip
    xq = op.QuantizeLinear(x, a_scale, a_zp)
    acc = op.ConvInteger(xq, w, a_zp, **_conv_attrs(stride, padding, dilation))
    return op.Add(op.Mul(op.Cast(acc, to=1), out_scale), bias)


def _act_qdq_onnx(x: Any, a_scale: Any, a_zp: Any) -> Any:
    return op.DequantizeLinear(op.QuantizeLinear(x, a_scale, a_zp), a_scale, a_zp)


TRANSLATIONS: dict[Callable[..., Any], Callable[..., Any]] = {
    torch.ops.diffkiln.qdq_linear.default: _qdq_linear_onnx,
    torch.ops.diffkiln.wo_linear.default: _wo_linear_onnx,
    torch.ops.diffkiln.qdq_conv.default: _qdq_conv_onnx,
    torch.ops.diffkiln.wo_conv.default: _wo_conv_onnx,
    torch.ops.diffkiln.int_linear.default: _int_linear_onnx,
    torch.ops.diffkiln.int_conv.default: _int_conv_onnx,
    torch.ops.diffkiln.act_qdq.default: _act_qdq_onnx,
}
"""Custom op -> onnxscript translation, for ``torch.onnx.export(custom_translation_table=...)``."""
