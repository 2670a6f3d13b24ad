"""A CPU emulation of the torch_npu ops diffkiln uses, written from their documented contracts.

``npu_quant_matmul(x1, x2, scale, *, offset=None, pertoken_scale=None, bias=None, output_dtype=None)``:
int8 GEMM into int32, plus int32 bias, times float scale (and per-token scale), cast to
float16/bfloat16 (int8 output is not emulated). ``npu_dynamic_quant(x)``: symmetric per-token int8.
It lets the npu backend's real code path run on CPU in tests.
"""

from __future__ import annotations

import types

import torch


def _npu_quant_matmul(x1, x2, scale, *, offset=None, pertoken_scale=None, bias=None, output_dtype=None):
    if x1.dtype != torch.int8 or x2.dtype != torch.int8:
        raise TypeError("npu_quant_matmul emulation: int8 inputs only")
    if output_dtype not in (torch.float16, torch.bfloat16):
        raise TypeError(f"npu_quant_matmul emulation: output_dtype {output_dtype} unsupported")
    if offset is not None:
        raise TypeError("npu_quant_matmul: offset is only valid with int8 output")
    acc = x1.to(torch.int64) @ x2.to(torch.int64)
    if bias is not None:
        acc = acc + bias.to(torch.int64)
    out = acc.to(torch.float32) * scale.to(torch.float32)
    if pertoken_scale is not None:
        out = out * pertoken_scale.to(torch.float32)[:, None]
    return out.to(output_dtype)


def _npu_dynamic_quant(x, smooth_scales=None):
    x = x.to(torch.float32)
    if smooth_scales is not None:
        x = x * smooth_scales
    s = x.abs().amax(-1) / 127.0
    s = torch.where(s > 0, s, torch.ones_like(s))
    return torch.clamp(torch.round(x / s[..., None]), -128, 127).to(torch.int8), s


def make_fake_torch_npu() -> types.ModuleType:
    mod = types.ModuleType("torch_npu")
    mod.npu_quant_matmul = _npu_quant_matmul  # type: ignore[attr-defined]
    mod.npu_dynamic_quant = _npu_dynamic_quant  # type: ignore[attr-defined]
    return mod
