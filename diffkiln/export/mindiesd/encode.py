"""One quantized Linear in the tensors MindIE-SD's ``quantize(model, quant_des_path)`` reads.

The contract, from MindIE-SD's own source (``mindiesd/quantization/quantize.py``, ``layer.py``):

* Only ``nn.Linear`` (and subclasses) are replaced; its quant map has nothing else.
* A layer is quantized when the description gives ``{L}.linear.weight``, ``{L}.weight`` or ``{L}``
  a quantization type. With SmoothQuant (``{L}.div.mul_scale`` present) every other tensor of the
  layer is read under ``{L}.linear.*``; ``x * mul_scale`` (in the model dtype) is what gets
  quantized.
* Static ``W8A8`` (``W8A8QuantLinear``): ``weight`` int8 (N, K); ``quant_bias`` int32 (N,);
  ``deq_scale`` (N,), used as stored; ``input_scale`` cast to float32 for float16 models and to
  bfloat16 for bfloat16 models, ``input_offset`` cast to int8, both (1,) repeated over K; and
  ``bias`` whenever the float layer has one (read although the static path adds ``quant_bias``).
  Run as ``npu_quant_matmul(npu_quantize(x, input_scale, input_offset), weight.T, deq_scale,
  bias=quant_bias)``, i.e. ``(round(x / input_scale + input_offset) @ weight.T + quant_bias) *
  deq_scale``. msModelSlim writes ``deq_scale`` as int64 holding the float32 bits for float16
  models (``npu_quant_matmul``'s int64 scale) and as float32 for bfloat16 models.
* ``W8A8_DYNAMIC``: ``weight``, ``weight_scale`` (squeezed, model dtype; float32 for float16
  models), ``bias`` (model dtype); ``npu_dynamic_quant`` (symmetric per token) then
  ``npu_quant_matmul(..., weight_scale, pertoken_scale=..., bias=bias)``.
* ``W8A8_TIMESTEP`` (``W8A8TimeStepQuantLinear``): the dynamic tensors plus the static ones with
  one row per step: ``input_scale``/``input_offset`` (T, 1), ``deq_scale``/``quant_bias`` (T, N);
  the step comes from ``TimestepManager.set_timestep_idx`` and whether it runs static or dynamic
  from the ``TimestepPolicyConfig`` passed to ``quantize`` (default: dynamic).
* ``W8A16`` (``WeightQuantLinear``): ``weight`` int8, ``weight_scale`` (N, 1) (transposed, model
  dtype), ``bias`` (model dtype; widened to float32 for bfloat16); ``npu_weight_quant_batchmatmul``.
  It ignores ``mul_scale``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from diffkiln.nn import QLinear

__all__ = ["LayerEncoding", "MindieExportError", "deq_scale_stored", "encode_linear", "input_scale_used"]


class MindieExportError(ValueError):
    """A layer cannot be written in the msModelSlim format; the message names it and why."""


@dataclass(frozen=True)
class LayerEncoding:
    """One layer's tensors and description entries.

    Attributes:
        kind: the layer's quantization type (``W8A8``, ``W8A8_DYNAMIC``, ``W8A8_TIMESTEP``, ``W8A16``).
        tensors: tensor name -> tensor.
        description: tensor name -> type (the kind, or ``FLOAT`` for the float bias).
    """

    kind: str
    tensors: dict[str, torch.Tensor]
    description: dict[str, str]


def input_scale_used(scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The input scale as MindIE-SD computes with it: float32 for float16 models, rounded to
    bfloat16 for bfloat16 models (``W8A8QuantBaseLinear._init_static_quant_param``)."""
    s = scale.to(torch.float32)
    return s if dtype == torch.float16 else s.to(torch.bfloat16).to(torch.float32)


def deq_scale_stored(deq: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``deq_scale`` as msModelSlim stores it: the float32 bits in an int64 (sign-extended from
    int32, as ``npu_trans_quant_param`` packs them) for float16 models, float32 for bfloat16."""
    deq = deq.to(torch.float32).contiguous()
    return deq.view(torch.int32).to(torch.int64) if dtype == torch.float16 else deq


def _static_rows(
    name: str, codes: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None, scales: torch.Tensor,
    zero_points: torch.Tensor, dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """``deq_scale`` (T, N) float32 and ``quant_bias`` (T, N) int32 for T activation grids."""
    used = input_scale_used(scales, dtype).to(torch.float64)  # (T,)
    deq = (used[:, None] * w_scale.to(torch.float64)[None, :]).to(torch.float32)  # (T, N)
    w_sum = codes.to(torch.int64).sum(1)  # (N,)
    qbias = -zero_points.to(torch.int64)[:, None] * w_sum[None, :]
    if bias is not None:
        qbias = qbias + torch.round(bias.to(torch.float64)[None, :] / deq.to(torch.float64)).to(torch.int64)
    if qbias.abs().max() >= 2**31:
        raise MindieExportError(f"{name}: quant_bias overflows int32 (bias too large for the accumulator scale)")
    return deq, qbias.to(torch.int32)


def encode_linear(name: str, q: QLinear, dtype: torch.dtype) -> LayerEncoding:
    """The tensors of ``q`` (the layer named ``name`` in the denoiser) for a ``dtype`` model.

    Raises:
        MindieExportError: a weight-only layer with SmoothQuant factors (MindIE-SD's ``W8A16``
            ignores ``mul_scale``).
    """
    codes = q.codes_t().t().contiguous()  # (N, K) int8; 4-/2-bit and grouped codes as int8 values
    scale, bias = q.scale_and_bias()
    w_scale = scale.to(torch.float32)
    smooth = q.smooth_inv is not None
    if smooth and q.weight_only:
        raise MindieExportError(f"{name}: MindIE-SD's W8A16 layer ignores SmoothQuant factors; rebuild without them")
    prefix = f"{name}.linear" if smooth else name
    out: dict[str, torch.Tensor] = {f"{prefix}.weight": codes}
    if q.weight_only:
        kind = "W8A16"
    elif q.dynamic:
        kind = "W8A8_DYNAMIC"
    else:
        kind = "W8A8" if len(q.step_grids) == 1 else "W8A8_TIMESTEP"
    if kind in ("W8A16", "W8A8_DYNAMIC", "W8A8_TIMESTEP"):
        out[f"{prefix}.weight_scale"] = w_scale.reshape(-1, 1)
        out[f"{prefix}.weight_offset"] = torch.zeros(w_scale.numel(), 1)
    if kind in ("W8A8", "W8A8_TIMESTEP"):
        grids = q.step_grids
        scales = torch.tensor([g.scale for g in grids], dtype=torch.float32)
        zps = torch.tensor([g.zero_point for g in grids], dtype=torch.int32)
        deq, qbias = _static_rows(name, codes, w_scale, bias, scales, zps, dtype)
        shape = (-1,) if kind == "W8A8" else (-1, 1)
        out[f"{prefix}.input_scale"] = scales.reshape(shape)
        out[f"{prefix}.input_offset"] = zps.to(torch.float32).reshape(shape)
        out[f"{prefix}.deq_scale"] = deq_scale_stored(deq[0] if kind == "W8A8" else deq, dtype)
        out[f"{prefix}.quant_bias"] = qbias[0] if kind == "W8A8" else qbias
    if smooth:
        assert q.smooth_inv is not None
        out[f"{name}.div.mul_scale"] = q.smooth_inv.to(torch.float32)
    description = {k: kind for k in out}
    if bias is not None:
        # W8A16's npu_weight_quant_batchmatmul takes the bias in the activation dtype (MindIE-SD
        # widens it to float32 itself for bfloat16); the W8A8 paths read a float32 bias.
        out[f"{prefix}.bias"] = bias.to(dtype if kind == "W8A16" else torch.float32)
        description[f"{prefix}.bias"] = "FLOAT"
    return LayerEncoding(kind, out, description)
