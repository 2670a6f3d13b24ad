"""A CPU emulation of the torch_npu ops diffkiln uses, written from their documented contracts.

``npu_quant_matmul(x1, x2, scale, *, offset=None, pertoken_scale=None, bias=None, output_dtype=None)``:
int8 GEMM into int32, plus int32 bias, times float scale (and per-token scale), cast to
float16/bfloat16 (int8 output is not emulated). ``npu_dynamic_quant(x)``: symmetric per-token int8.
``npu_convert_weight_to_int4pack(w)``: int32 (K, N) holding int4 values -> int32 (K, N / 8), eight
nibbles per word, lowest index in the lowest bits. ``npu_weight_quant_batchmatmul(x, weight,
antiquant_scale, antiquant_offset=None, ..., bias=None)``: float16/bfloat16 x (M, K) against int8
(K, N) or int4-packed int32 (K, N / 8) weights, ``x @ ((w + offset) * scale) + bias`` in x's dtype.
``npu_quantize(x, scales, zero_points, dtype, axis, div_mode=True)``: ``round(x / scales +
zero_points)`` saturated to int8 (qint8 output as int8).
``npu_fusion_attention(q, k, v, head_num, "BNSD", atten_mask=None, scale=1.)``: softmax(q k^T x
scale) v, positions where atten_mask is True masked out; the output first of seven outputs.
A ``scale`` of dtype int64 holds float32
bits (``npu_trans_quant_param``); an integer ``bias`` is added to the int32 sums, a float one after
the scales. It lets the npu backend's real code path, and MindIE-SD's layers, run on CPU in tests.
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
    int_bias = bias is not None and not bias.is_floating_point()
    if int_bias:
        acc = acc + bias.to(torch.int64)
    if scale.dtype == torch.int64:  # float32 bits, as npu_trans_quant_param packs them
        scale = scale.to(torch.int32).view(torch.float32)
    out = acc.to(torch.float32) * scale.to(torch.float32)
    if pertoken_scale is not None:
        out = out * pertoken_scale.to(torch.float32)[:, None]
    if bias is not None and not int_bias:
        out = out + bias.to(torch.float32)
    return out.to(output_dtype)


def _npu_quantize(x, scales, zero_points, dtype, axis=1, div_mode=True):
    if not div_mode or dtype not in (torch.qint8, torch.int8):
        raise TypeError("npu_quantize emulation: div_mode=True with int8 output only")
    if axis not in (-1, x.dim() - 1):
        raise TypeError("npu_quantize: the elementwise axis must be the last one")
    y = x.to(torch.float32) / scales.to(torch.float32)
    if zero_points is not None:
        y = y + zero_points.to(torch.float32)
    return torch.clamp(torch.round(y), -128, 127).to(torch.int8)


def _npu_dynamic_quant(x, smooth_scales=None):
    x = x.to(torch.float32)
    if smooth_scales is not None:
        x = x * smooth_scales
    s = x.abs().amax(-1) / 127.0
    s = torch.where(s > 0, s, torch.ones_like(s))
    return torch.clamp(torch.round(x / s[..., None]), -128, 127).to(torch.int8), s


def _npu_convert_weight_to_int4pack(weight, inner_k_tiles=0):
    if weight.dtype != torch.int32 or weight.dim() != 2 or weight.shape[1] % 8:
        raise TypeError("npu_convert_weight_to_int4pack emulation: int32 (K, N) with N a multiple of 8")
    if int(weight.min()) < -8 or int(weight.max()) > 7:
        raise ValueError("npu_convert_weight_to_int4pack: values must be int4")
    nib = (weight & 0xF).reshape(weight.shape[0], -1, 8).to(torch.int64)
    word = sum(nib[..., i] << (4 * i) for i in range(8))
    return torch.where(word >= 2**31, word - 2**32, word).to(torch.int32)


def _unpack_int4_words(packed):
    words = packed.to(torch.int64) & 0xFFFFFFFF
    nibs = torch.stack([(words >> (4 * i)) & 0xF for i in range(8)], dim=-1)
    nibs = torch.where(nibs >= 8, nibs - 16, nibs)
    return nibs.reshape(packed.shape[0], -1)


def _npu_weight_quant_batchmatmul(
    x, weight, antiquant_scale, antiquant_offset=None, quant_scale=None, quant_offset=None, bias=None,
    antiquant_group_size=0, inner_precise=0,
):  # fmt: skip
    if x.dtype not in (torch.float16, torch.bfloat16):
        raise TypeError(f"npu_weight_quant_batchmatmul emulation: x must be float16/bfloat16, got {x.dtype}")
    if antiquant_scale.dtype != x.dtype:
        raise TypeError("npu_weight_quant_batchmatmul: antiquant_scale must have x's dtype")
    if quant_scale is not None or antiquant_group_size:
        raise TypeError("npu_weight_quant_batchmatmul emulation: per-channel, float output only")
    if weight.dtype == torch.int32:
        w = _unpack_int4_words(weight)
    elif weight.dtype == torch.int8:
        w = weight.to(torch.int64)
    else:
        raise TypeError(f"npu_weight_quant_batchmatmul: weight must be int8 or int32 (int4 pack), got {weight.dtype}")
    wf = w.to(torch.float32)
    if antiquant_offset is not None:
        wf = wf + antiquant_offset.to(torch.float32)
    wf = wf * antiquant_scale.to(torch.float32).reshape(1, -1)
    out = x.to(torch.float32) @ wf
    if bias is not None:
        out = out + bias.to(torch.float32)
    return out.to(x.dtype)


def _npu_fusion_attention(query, key, value, head_num, input_layout, pse=None, padding_mask=None, atten_mask=None,
                          scale=1.0, keep_prob=1.0, **_kwargs):  # fmt: skip
    # BNSD only; atten_mask True (or 1) masks a position out; scale multiplies Q K^T; 7 outputs.
    if input_layout != "BNSD":
        raise TypeError(f"npu_fusion_attention emulation: BNSD only, got {input_layout}")
    if query.shape[1] != head_num:
        raise ValueError("npu_fusion_attention: head_num must match the N axis")
    scores = (query.float() @ key.float().transpose(-1, -2)) * scale
    if atten_mask is not None:
        scores = scores.masked_fill(atten_mask.bool(), float("-inf"))
    out = (torch.softmax(scores, dim=-1) @ value.float()).to(query.dtype)
    return out, None, None, None, 0, 0, 0


def make_fake_torch_npu() -> types.ModuleType:
    mod = types.ModuleType("torch_npu")
    mod.npu_convert_weight_to_int4pack = _npu_convert_weight_to_int4pack  # type: ignore[attr-defined]
    mod.npu_weight_quant_batchmatmul = _npu_weight_quant_batchmatmul  # type: ignore[attr-defined]
    mod.npu_quant_matmul = _npu_quant_matmul  # type: ignore[attr-defined]
    mod.npu_dynamic_quant = _npu_dynamic_quant  # type: ignore[attr-defined]
    mod.npu_quantize = _npu_quantize  # type: ignore[attr-defined]
    mod.npu_fusion_attention = _npu_fusion_attention  # type: ignore[attr-defined]
    return mod
