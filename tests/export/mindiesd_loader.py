"""A loader for msModelSlim / MindIE-SD quantized weights, written from the format's description
alone (docs/mindiesd-export.md), independent of diffkiln's runtime: the test's second opinion.

It builds the float architecture from ``config.json``, assigns the ``FLOAT`` tensors, and replaces
each layer described ``W8A8`` / ``W8A8_DYNAMIC`` / ``W8A16`` by a module computing msModelSlim's
formulas (float64 accumulation, exact for these integer products):

* W8A8: ``xq = clamp(round(x * mul_scale / input_scale + input_offset), -128, 127)``,
  ``y = (xq @ weight.T + quant_bias) * deq_scale`` (a convolution pads ``xq`` with ``input_offset``,
  the code of 0.0);
* W8A8_DYNAMIC: per-token ``s = absmax / 127``, ``y = (round(x / s) @ weight.T) * s * weight_scale + bias``;
* W8A16: ``y = x @ ((weight - weight_offset) * weight_scale).T + bias``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn


class _MindieLayer(nn.Module):
    def __init__(self, kind: str, t: dict[str, torch.Tensor], conv: nn.Conv2d | None):
        super().__init__()
        self.kind, self.t = kind, {k: v.double() if v.is_floating_point() else v for k, v in t.items()}
        self.conv = None if conv is None else (conv.stride, conv.padding, conv.dilation)

    def _matmul(self, x: torch.Tensor, w: torch.Tensor, pad_value: float = 0.0) -> torch.Tensor:
        if self.conv is None:
            return x @ w.reshape(w.shape[0], -1).t()
        stride, (ph, pw), dilation = self.conv
        x = F.pad(x, (pw, pw, ph, ph), value=pad_value)
        return F.conv2d(x, w, None, stride, 0, dilation)

    def _channel(self, v: torch.Tensor) -> torch.Tensor:
        return v.view(1, -1, 1, 1) if self.conv is not None else v

    def _dynamic(self, xd: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """Per-token symmetric int8 activations; a convolution's tokens are its im2col patches."""
        t = self.t
        rows = xd
        if self.conv is not None:
            stride, padding, dilation = self.conv
            b, _, h, wd = xd.shape
            rows = F.unfold(xd, w.shape[2:], dilation=dilation, padding=padding, stride=stride).transpose(1, 2)
        s = rows.abs().amax(dim=-1, keepdim=True).clamp_min(1e-12) / 127.0
        acc = torch.clamp(torch.round(rows / s), -128, 127) @ w.reshape(w.shape[0], -1).t()
        out = acc * s * t["weight_scale"]
        if "bias" in t:
            out = out + t["bias"]
        if self.conv is None:
            return out
        oh = (h + 2 * padding[0] - dilation[0] * (w.shape[2] - 1) - 1) // stride[0] + 1
        ow = (wd + 2 * padding[1] - dilation[1] * (w.shape[3] - 1) - 1) // stride[1] + 1
        return out.transpose(1, 2).reshape(b, w.shape[0], oh, ow)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t, xd = self.t, x.double()
        if "div.mul_scale" in t:
            xd = xd * (t["div.mul_scale"].view(1, -1, 1, 1) if self.conv is not None else t["div.mul_scale"])
        w = t["weight"].double()
        if self.kind == "W8A16":
            wf = (w - t["weight_offset"].view(-1, *[1] * (w.dim() - 1))) * t["weight_scale"].view(
                -1, *[1] * (w.dim() - 1)
            )
            out = self._matmul(xd, wf)
            if "bias" in t:
                out = out + self._channel(t["bias"])
        elif self.kind == "W8A8_DYNAMIC":
            out = self._dynamic(xd, w)
        else:
            scale, offset = t["input_scale"].item(), t["input_offset"].item()
            xq = torch.clamp(torch.round(xd.float() / float(scale)).double() + offset, -128, 127)
            out = self._matmul(xq, w, pad_value=offset)  # padding is the code of 0.0
            out = (out + self._channel(t["quant_bias"].double())) * self._channel(t["deq_scale"])
        if "bos_rows" in t and x.dim() == 3:
            out = out.clone()
            out[:, t["bos_positions"]] = t["bos_rows"]
        if "output_scale" in t:  # a requantized convolution output (docs/mindiesd-export.md)
            scale, offset = float(t["output_scale"]), float(t["output_offset"])
            out = (torch.clamp(torch.round(out.float() / scale) + offset, -128, 127) - offset) * scale
        return out.to(x.dtype)


def load_mindiesd(folder: Path) -> nn.Module:
    """The denoiser of a MindIE-SD export folder, computing the format's formulas."""
    import diffusers

    meta = json.loads((folder / "diffkiln_export.json").read_text())
    algo = meta["algo"]
    description = json.loads((folder / f"quant_model_description_{algo}.json").read_text())
    tensors = load_file(str(folder / f"quant_model_weight_{algo}.safetensors"))
    cls = getattr(diffusers, meta["denoiser_class"])
    model = cls.from_config(cls.load_config(folder))
    quant_layers = {
        key[: -len(".weight")]: kind for key, kind in description.items() if key.endswith(".weight") and kind != "FLOAT"
    }
    floats = {
        k: v.float()
        for k, v in tensors.items()
        if description.get(k) == "FLOAT"
        and not k.endswith((".bos_rows", ".bos_positions", ".output_scale", ".output_offset"))
    }
    missing, unexpected = model.load_state_dict(floats, strict=False)
    if unexpected:
        raise KeyError(f"FLOAT tensors the architecture lacks: {unexpected[:3]}")
    for name, kind in quant_layers.items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        old = getattr(parent, child)
        prefix = f"{name}."
        own = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
        setattr(parent, child, _MindieLayer(kind, own, old if isinstance(old, nn.Conv2d) else None))
    left = [k for k in missing if k.rpartition(".")[0] not in quant_layers]
    if left:
        raise KeyError(f"tensors the export lacks: {left[:3]}")
    return model.eval()
