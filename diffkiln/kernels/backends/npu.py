"""The Ascend NPU backend: torch_npu's ``npu_quant_matmul`` family, imported lazily on first use."""

from __future__ import annotations

import importlib
from typing import Any

import torch

from diffkiln.kernels.backends.base import (
    GenericStaticLinear,
    register_backend,
    unpacked_quant_matmul,
    unpacked_weight_only_matmul,
)

__all__ = ["NpuBackend"]


@register_backend("npu")
class NpuBackend:
    """torch_npu's fused kernels: npu_quant_matmul and npu_dynamic_quant (imported lazily)."""

    name = "npu"

    def __init__(self) -> None:
        try:
            self._npu: Any = importlib.import_module("torch_npu")
        except ImportError as exc:
            raise RuntimeError(
                "the npu backend needs torch_npu; on an Ascend host run `pip install 'diffkiln[npu]'`"
            ) from exc

    def int_mm(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError(
            "torch_npu has no int8 GEMM with an int32 output; use quant_matmul, which fuses the scales"
        )

    def quant_matmul(self, x, w, scale, bias, pertoken_scale, output_dtype):
        # npu_quant_matmul writes float16 or bfloat16 only; a float32 request gets bfloat16, upcast.
        npu_dtype = output_dtype if output_dtype in (torch.float16, torch.bfloat16) else torch.bfloat16
        out = self._npu.npu_quant_matmul(
            x, w, scale.to(torch.float32), pertoken_scale=pertoken_scale, bias=bias, output_dtype=npu_dtype
        )
        return out.to(output_dtype)

    def dynamic_quant(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        q, s = self._npu.npu_dynamic_quant(x)
        return q, s.to(torch.float32)

    def packed_quant_matmul(self, x, w, scale, bias, pertoken_scale, output_dtype, zero_point):
        # npu_quant_matmul's int4 form needs int4 activations too; with int8 activations the codes
        # are widened to int8 for this call (the resident copy stays packed).
        return unpacked_quant_matmul(self, x, w, scale, bias, pertoken_scale, output_dtype, zero_point)

    def packed_weight_only_matmul(self, x, w, scale, bias):
        # Unpacked for the call, then int4-packed for npu_weight_quant_batchmatmul (weight_only_matmul).
        return unpacked_weight_only_matmul(self, x, w, scale, bias)

    def weight_only_matmul(self, x, w, scale, bias, bits):
        # npu_weight_quant_batchmatmul dequantizes inside the cube kernel. It takes float16 or
        # bfloat16 x with a scale of the same dtype; 4-, 3- and 2-bit codes (all within int4) go in
        # as int32-packed int4 (npu_convert_weight_to_int4pack) when N allows, other codes as int8.
        dtype = x.dtype if x.dtype in (torch.float16, torch.bfloat16) else torch.float16
        int4 = bits <= 4 and w.shape[1] % 8 == 0  # the int4 pack holds eight values per int32 along N
        weight = self._npu.npu_convert_weight_to_int4pack(w.to(torch.int32)) if int4 else w
        out = self._npu.npu_weight_quant_batchmatmul(
            x.to(dtype), weight, scale.to(dtype), bias=None if bias is None else bias.to(torch.float32)
        )
        return out.to(torch.float32)

    def prepack_static_linear(self, w_q, w_scale, bias, act):
        return GenericStaticLinear(self, w_q, w_scale, bias, act)

    def prepack_static_conv(self, w_q, w_scale, bias, act, geometry):
        return None  # im2col + npu_quant_matmul

    def static_conv_unpacked(self, x, w_codes, w_scale, bias, act, geometry):
        return None  # im2col + npu_quant_matmul
